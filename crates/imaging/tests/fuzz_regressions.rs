//! Replays every input the fuzzer ever crashed on (and hand-made hostile inputs): each must end
//! as an output or a typed error, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_imaging::{Fit, Limits, Options, OutputFormat};
use std::path::Path;

fn run(data: &[u8]) {
    let limits =
        Limits { max_pixels: 4_000_000, max_side: 4096, max_input_bytes: 1 << 20, max_scans: 64, max_frames: 100, ..Limits::default() };
    let _ = pixmesh_imaging::probe(data, &limits);
    let options = Options { width: Some(48), height: Some(32), fit: Fit::Cover, format: OutputFormat::Png, ..Options::default() };
    if let Ok(out) = pixmesh_imaging::process(data, &options, &limits) {
        assert!(pixmesh_imaging::sniff(&out.bytes).is_some());
    }
    let tiny = Options { width: Some(6), format: OutputFormat::Jpeg, ..Options::default() };
    if let Ok(out) = pixmesh_imaging::process(data, &tiny, &limits) {
        assert!(out.width <= 6);
    }
}

#[test]
fn saved_crash_inputs_no_longer_crash() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
    }
    eprintln!("replayed {count} saved inputs");
}

/// Headers that claim enormous sizes, in every format: refused from the header.
#[test]
fn lying_headers_are_refused_before_allocation() {
    let limits = Limits::default();
    // PNG IHDR claiming 100000 x 100000.
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&100_000u32.to_be_bytes());
    png.extend_from_slice(&100_000u32.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    // GIF logical screen 65535 x 65535.
    let gif = b"GIF89a\xff\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02D\x01\x00;".to_vec();
    for data in [png, gif] {
        let err = pixmesh_imaging::probe(&data, &limits).unwrap_err();
        assert!(matches!(err.code(), "image_too_large" | "limit_exceeded" | "corrupt_image"), "{err}");
    }
}

/// Writes the fuzzer's seed corpus (small valid images of every readable format).
#[test]
#[ignore = "writes files; run by hand to refresh fuzz/seeds"]
fn write_seeds() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    std::fs::create_dir_all(&out).unwrap();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, 77])));
    for (name, format) in [
        ("seed.jpg", image::ImageFormat::Jpeg),
        ("seed.png", image::ImageFormat::Png),
        ("seed.gif", image::ImageFormat::Gif),
        ("seed.bmp", image::ImageFormat::Bmp),
        ("seed.tif", image::ImageFormat::Tiff),
        ("seed.webp", image::ImageFormat::WebP),
    ] {
        img.save_with_format(out.join(name), format).unwrap();
    }
}
