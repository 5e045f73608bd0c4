//! JPEGs with a damaged metadata segment (an Adobe APP14 cut short, a Photoshop APP13 with a
//! zeroed length or a corrupt 8BIM resource) still hold a whole image, and libjpeg-based
//! readers (libvips, Pillow, browsers) decode them, warning at most. pixmesh must decode them
//! too, at full size (where `image`'s zune-jpeg would refuse some) and reduced (its own
//! decoder), with the same pixels as the undamaged file.
//!
//! The damage is made here from real encoder output, so the test needs no fixture files. The
//! same damage applied with Python to `../shared/corpus/edge/hopper.jpg` and to an encoded
//! gradient was checked to decode with `vips copy` (libvips 8.14, libjpeg-turbo 2.1) and
//! Pillow 13.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_imaging::{ImagingError, Limits, Options, OutputFormat, probe, process};

/// A photo-like JPEG: gradients and some texture, 4:2:0, with a JFIF APP0 (`image`'s encoder).
fn photo(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let t = ((x * 7 + y * 13) % 17) as u8;
        image::Rgb([((x * 255) / w) as u8 ^ t, ((y * 255) / h) as u8, (((x + y) * 127) / (w + h)) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// `jpeg` with `segment` (raw bytes, marker included) inserted right after SOI.
fn with_segment(jpeg: &[u8], segment: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(segment);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A marker segment whose length field says `declared` (counting itself), followed by `payload`
/// whatever its real length.
fn segment(marker: u8, declared: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFF, marker];
    out.extend_from_slice(&declared.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The 12-byte Adobe APP14 payload: "Adobe", version 100, flags 0 and 0, `transform`.
fn adobe(transform: u8) -> Vec<u8> {
    let mut p = b"Adobe".to_vec();
    p.extend_from_slice(&100u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, transform]);
    p
}

/// A Photoshop APP13 payload: one 8BIM IPTC resource (0x0404) declaring `size` bytes, holding
/// a few IPTC bytes (no 0xFF among them).
fn photoshop(size: u32) -> Vec<u8> {
    let mut p = b"Photoshop 3.0\0".to_vec();
    p.extend_from_slice(b"8BIM");
    p.extend_from_slice(&0x0404u16.to_be_bytes());
    p.extend_from_slice(&[0, 0]); // empty Pascal name, padded
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&[0x1c, 0x02, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00]);
    p
}

/// Every damage that libvips and Pillow decode through, by name.
fn damaged(jpeg: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let ps = photoshop(8);
    vec![
        // The declared length covers "Adobe" and 2 bytes; the rest of the payload follows as
        // stray bytes before the next marker (libjpeg: "extraneous bytes before marker").
        ("APP14 length shorter than the Adobe payload", with_segment(jpeg, &segment(0xEE, 9, &adobe(1)))),
        ("APP14 length zeroed", with_segment(jpeg, &segment(0xEE, 0, &adobe(1)))),
        ("APP14 with an unknown Adobe transform", with_segment(jpeg, &segment(0xEE, 14, &adobe(7)))),
        ("APP13 length zeroed", with_segment(jpeg, &segment(0xED, 0, &ps))),
        ("APP13 length shorter than its 8BIM block", with_segment(jpeg, &segment(0xED, 2 + 20, &ps))),
        ("APP13 8BIM resource running past its segment", {
            let bad = photoshop(0x7fff_0000);
            with_segment(jpeg, &segment(0xED, 2 + bad.len() as u16, &bad))
        }),
    ]
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

fn rgb(png: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(png, image::ImageFormat::Png).unwrap().into_rgb8()
}

fn check_decodes_like_the_original(name: &str, original: &[u8], bytes: &[u8], w: u32, h: u32) {
    let limits = Limits::default();
    let p = probe(bytes, &limits).unwrap_or_else(|e| panic!("{name}: probe: {e:?}"));
    assert_eq!((p.width, p.height), (w, h), "{name}");
    // Full size goes to the general decoder first; a quarter of it to pixmesh's own.
    for width in [None, Some(w / 4)] {
        let options = Options { width, format: OutputFormat::Png, ..Options::default() };
        let out = process(bytes, &options, &limits).unwrap_or_else(|e| panic!("{name} at width {width:?}: {e:?}"));
        let expected = process(original, &options, &limits).unwrap();
        assert_eq!((out.width, out.height), (expected.width, expected.height), "{name}");
        let quality = psnr(rgb(&out.bytes).as_raw(), rgb(&expected.bytes).as_raw());
        assert!(quality > 35.0, "{name} at width {width:?}: {quality:.1} dB from the undamaged file's pixels");
    }
}

#[test]
fn damaged_metadata_segments_do_not_lose_the_image() {
    let original = photo(160, 120);
    for (name, bytes) in damaged(&original) {
        check_decodes_like_the_original(name, &original, &bytes, 160, 120);
    }
    // A progressive file (libjpeg-turbo's cjpeg) takes another path through both decoders.
    let progressive = include_bytes!("data/progressive-420.jpg");
    for (name, bytes) in damaged(progressive) {
        check_decodes_like_the_original(name, progressive, &bytes, 83, 61);
    }
    // And a real photo when the shared corpus is there.
    if let Some(edge) = pixmesh_corpus_edge() {
        let hopper = std::fs::read(edge.join("hopper.jpg")).unwrap();
        for (name, bytes) in damaged(&hopper) {
            check_decodes_like_the_original(name, &hopper, &bytes, 128, 128);
        }
    }
}

/// Damage that takes the image with it still fails, as it does in libjpeg: the tolerance is
/// for metadata, not for the frame.
#[test]
fn damage_beyond_metadata_is_still_corrupt() {
    let original = photo(64, 48);
    let check = |name: &str, bytes: &[u8]| {
        for width in [None, Some(16)] {
            let options = Options { width, format: OutputFormat::Png, ..Options::default() };
            match process(bytes, &options, &Limits::default()) {
                Err(ImagingError::Corrupt { .. }) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    };
    // An APP13 declaring more bytes than the file has: the frame header is swallowed.
    check("APP13 longer than the file", &with_segment(&original, &segment(0xED, 0xFFFF, &photoshop(8))));
    // A quantization table with a zeroed length.
    let at = original.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
    let mut no_dqt = original.clone();
    no_dqt[at + 2..at + 4].copy_from_slice(&[0, 0]);
    check("DQT length zeroed", &no_dqt);
}

/// `../shared/corpus/edge` beside the repository, if present.
fn pixmesh_corpus_edge() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/edge");
    dir.is_dir().then_some(dir)
}
