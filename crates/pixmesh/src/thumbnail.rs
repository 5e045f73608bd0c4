//! `pixmesh thumbnail`: the image pipeline on local files, like `vipsthumbnail`.
//! One image per thread, as many threads as cores: across images, not inside one.

use pixmesh_imaging::{Crop, Fit, Flip, Gravity, Limits, Options, OutputFormat};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(clap::Args, Debug, Clone)]
pub struct ThumbnailArgs {
    /// Images to process.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub width: Option<u32>,
    #[arg(long)]
    pub height: Option<u32>,
    /// contain | cover | fill | inside
    #[arg(long, default_value = "contain")]
    pub fit: String,
    /// jpeg | png | webp | same
    #[arg(long, default_value = "same")]
    pub format: String,
    #[arg(long)]
    pub quality: Option<u8>,
    /// WebP only: lossless.
    #[arg(long)]
    pub lossless: bool,
    /// Allow output larger than the input.
    #[arg(long)]
    pub enlarge: bool,
    /// cover: which part to keep (center, north, south-east, …).
    #[arg(long, default_value = "center")]
    pub gravity: String,
    /// Clockwise rotation: 0, 90, 180, 270.
    #[arg(long, default_value_t = 0)]
    pub rotate: u16,
    /// h | v | hv
    #[arg(long)]
    pub flip: Option<String>,
    /// x,y,width,height (after rotate and flip)
    #[arg(long)]
    pub crop: Option<String>,
    #[arg(long)]
    pub grayscale: bool,
    /// Gaussian blur sigma.
    #[arg(long)]
    pub blur: Option<f32>,
    /// Unsharp-mask sigma.
    #[arg(long)]
    pub sharpen: Option<f32>,
    /// Where to write the results (created if missing).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn output_path(dir: &Path, input: &Path, format: &str) -> PathBuf {
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let ext = if format == "jpeg" { "jpg" } else { format };
    dir.join(format!("{stem}.{ext}"))
}

/// Processes every input; returns how many failed. Each failure is one line on stderr.
pub fn run(args: ThumbnailArgs) -> anyhow::Result<usize> {
    let options = Options {
        width: args.width,
        height: args.height,
        fit: args.fit.parse::<Fit>()?,
        format: args.format.parse::<OutputFormat>()?,
        quality: args.quality,
        enlarge: args.enlarge,
        lossless: args.lossless,
        gravity: args.gravity.parse::<Gravity>()?,
        rotate: args.rotate,
        flip: args.flip.as_deref().map(str::parse::<Flip>).transpose()?,
        crop: args.crop.as_deref().map(str::parse::<Crop>).transpose()?,
        grayscale: args.grayscale,
        blur: args.blur,
        sharpen: args.sharpen,
        negotiated: false,
    };
    options.validate()?;
    std::fs::create_dir_all(&args.output)?;
    let threads = if args.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { args.threads };
    let limits = Limits::default();
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let stderr = Mutex::new(());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(args.inputs.len()).max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(input) = args.inputs.get(i) else { return };
                    let result = std::fs::read(input)
                        .map_err(|e| e.to_string())
                        .and_then(|bytes| pixmesh_imaging::process(&bytes, &options, &limits).map_err(|e| e.to_string()))
                        .and_then(|out| {
                            let path = output_path(&args.output, input, out.format.as_str());
                            std::fs::write(&path, &out.bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
                        });
                    if let Err(reason) = result {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let _guard = stderr.lock();
                        eprintln!("pixmesh thumbnail: {}: {reason}", input.display());
                    }
                }
            });
        }
    });
    Ok(failed.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outputs_after_inputs() {
        assert_eq!(output_path(Path::new("out"), Path::new("a/b/photo.JPG"), "jpeg"), PathBuf::from("out/photo.jpg"));
        assert_eq!(output_path(Path::new("out"), Path::new("x.png"), "webp"), PathBuf::from("out/x.webp"));
    }
}
