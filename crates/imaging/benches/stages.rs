//! The hot stages of the pipeline, each beside an anchor in the same run; prints ratios.
//! `cargo bench -p pixmesh-imaging` (images are generated, so no corpus is needed).
//!
//! - decode: pixmesh's JPEG decoder at 1/2 scale (≥ 2× the 800 px target) vs jpeg-decoder at the
//!   same scale and vs a full decode (the `image` crate's zune-jpeg), baseline and progressive;
//! - resize: fast_image_resize Lanczos3 vs `image::imageops::resize` Lanczos3;
//! - encode: pixmesh's JPEG settings (jpeg-encoder, 4:2:0 averaged) vs the `image` crate's encoder;
//! - whole pipeline: `pixmesh_imaging::process` vs decode + resize + encode with `image` alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

use image::{DynamicImage, ImageEncoder};
use pixmesh_imaging::{Limits, Options, OutputFormat};
use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

/// Median time of `f` over enough runs to fill about a second (at least 3).
fn time<T>(mut f: impl FnMut() -> T) -> Duration {
    let first = Instant::now();
    black_box(f());
    let one = first.elapsed().max(Duration::from_micros(1));
    let runs = (Duration::from_secs(1).as_nanos() / one.as_nanos()).clamp(3, 200) as usize;
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn report(stage: &str, ours: Duration, anchor: Duration, anchor_name: &str) {
    println!(
        "{stage:<34} pixmesh {:>9.2} ms   {anchor_name:<26} {:>9.2} ms   speedup {:>5.2}x",
        ours.as_secs_f64() * 1e3,
        anchor.as_secs_f64() * 1e3,
        anchor.as_secs_f64() / ours.as_secs_f64()
    );
}

fn photo(w: u32, h: u32) -> DynamicImage {
    // Smooth gradients plus texture, so the entropy coder has real work.
    DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
        let n = ((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 7) as u8 & 31;
        image::Rgb([((x * 255) / w) as u8 ^ n, ((y * 255) / h) as u8, (((x + y) * 255) / (w + h)) as u8 ^ (n / 2)])
    }))
}

fn main() {
    let (w, h) = (4000, 3000);
    let img = photo(w, h);
    let mut jpeg = Vec::new();
    img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    println!("input: {w}x{h} baseline JPEG, {} KB; target 800 px wide, JPEG q80", jpeg.len() / 1024);

    // decode: pixmesh's decoder at 1/2 scale (the pipeline's choice for 800 px) against
    // jpeg-decoder's scaled IDCT at the same scale, and against a full decode (zune-jpeg, the
    // `image` crate's decoder); baseline and progressive.
    let mut progressive = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut progressive, 90);
    encoder.set_progressive(true);
    encoder.encode(img.to_rgb8().as_raw(), w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();
    for (kind, bytes) in [("baseline", &jpeg), ("progressive", &progressive)] {
        let ours = time(|| pixmesh_imaging::decode_jpeg_scaled(bytes, 2, &Limits::default()).unwrap());
        let scaled = time(|| {
            let mut d = jpeg_decoder::Decoder::new(Cursor::new(bytes));
            d.scale(2000, 1500).unwrap();
            d.decode().unwrap()
        });
        let full = time(|| image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).unwrap());
        report(&format!("decode {kind} at 1/2"), ours, scaled, "jpeg-decoder at 1/2");
        report(&format!("decode {kind} at 1/2"), ours, full, "zune-jpeg full size");
    }

    // resize
    let rgb = img.to_rgb8();
    let ours = time(|| {
        let src = fast_image_resize::images::ImageRef::new(w, h, rgb.as_raw(), fast_image_resize::PixelType::U8x3).unwrap();
        let mut dst = fast_image_resize::images::Image::new(800, 600, fast_image_resize::PixelType::U8x3);
        let opts = fast_image_resize::ResizeOptions::new()
            .resize_alg(fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Lanczos3));
        fast_image_resize::Resizer::new().resize(&src, &mut dst, &opts).unwrap();
        dst
    });
    let anchor = time(|| image::imageops::resize(&rgb, 800, 600, image::imageops::FilterType::Lanczos3));
    report("resize 4000x3000 -> 800x600", ours, anchor, "image::imageops::resize");

    // encode
    let small = image::imageops::resize(&rgb, 800, 600, image::imageops::FilterType::Triangle);
    let ours = time(|| {
        let mut out = Vec::new();
        let mut e = jpeg_encoder::Encoder::new(&mut out, 80);
        e.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
        e.set_chroma_subsampling_method(jpeg_encoder::ChromaSubsamplingMethod::Average);
        e.set_optimized_huffman_tables(true);
        e.encode(small.as_raw(), 800, 600, jpeg_encoder::ColorType::Rgb).unwrap();
        out
    });
    let anchor = time(|| {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
            .write_image(small.as_raw(), 800, 600, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    });
    report("encode 800x600 JPEG q80", ours, anchor, "image JpegEncoder");

    // whole pipeline
    let options = Options { width: Some(800), format: OutputFormat::Jpeg, quality: Some(80), ..Options::default() };
    let ours = time(|| pixmesh_imaging::process(&jpeg, &options, &Limits::default()).unwrap());
    let anchor = time(|| {
        let decoded = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
        let resized = decoded.resize(800, 600, image::imageops::FilterType::Lanczos3);
        let mut out = Vec::new();
        resized.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
        out
    });
    report("pipeline 12 MP JPEG -> 800 px JPEG", ours, anchor, "image crate end to end");
}
