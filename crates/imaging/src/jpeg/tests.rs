//! The decoder against the source pixels, against `jpeg-decoder`, and against hostile bytes.

use super::*;

const ANY: Budget = Budget { bytes: u64::MAX, scans: usize::MAX };

const SOURCE: &[u8] = include_bytes!("../../tests/data/source.ppm");
const PROGRESSIVE_420: &[u8] = include_bytes!("../../tests/data/progressive-420.jpg");
const PROGRESSIVE_444_RESTART: &[u8] = include_bytes!("../../tests/data/progressive-444-restart.jpg");
const PROGRESSIVE_GRAY: &[u8] = include_bytes!("../../tests/data/progressive-gray.jpg");
const BASELINE_422_RESTART: &[u8] = include_bytes!("../../tests/data/baseline-422-restart.jpg");
const ADOBE_YCCK: &[u8] = include_bytes!("../../tests/data/adobe-cmyk.jpg");

/// (width, height, RGB) of the binary PPM fixture.
fn source() -> (usize, usize, Vec<u8>) {
    let text = String::from_utf8_lossy(&SOURCE[..20]);
    let mut fields = text.split_ascii_whitespace();
    assert_eq!(fields.next(), Some("P6"));
    let w: usize = fields.next().unwrap().parse().unwrap();
    let h: usize = fields.next().unwrap().parse().unwrap();
    let pixels = SOURCE[SOURCE.len() - w * h * 3..].to_vec();
    (w, h, pixels)
}

fn gray(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3).map(|p| ((299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]) + 500) / 1000) as u8).collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

/// Area average of `d`×`d` cells (partial cells at the edges average what they cover).
fn box_down(w: usize, h: usize, ch: usize, px: &[u8], d: usize) -> Vec<u8> {
    let (ow, oh) = (w.div_ceil(d), h.div_ceil(d));
    let mut out = Vec::with_capacity(ow * oh * ch);
    for oy in 0..oh {
        for ox in 0..ow {
            for c in 0..ch {
                let (mut sum, mut n) = (0u32, 0u32);
                for y in oy * d..((oy + 1) * d).min(h) {
                    for x in ox * d..((ox + 1) * d).min(w) {
                        sum += u32::from(px[(y * w + x) * ch + c]);
                        n += 1;
                    }
                }
                out.push(((sum + n / 2) / n) as u8);
            }
        }
    }
    out
}

fn reference(bytes: &[u8]) -> Vec<u8> {
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.decode().unwrap()
}

#[test]
fn every_kind_decodes_to_the_source_at_every_scale() {
    let (w, h, rgb) = source();
    let luma = gray(&rgb);
    // (file, gray?, the PSNR the file reaches at full size against the source)
    let cases = [
        (PROGRESSIVE_420, false, 30.0),
        (PROGRESSIVE_444_RESTART, false, 35.0),
        (PROGRESSIVE_GRAY, true, 40.0),
        (BASELINE_422_RESTART, false, 31.0),
        (ADOBE_YCCK, false, 34.0),
    ];
    for (i, (bytes, is_gray, floor)) in cases.into_iter().enumerate() {
        let (ch, expected) = if is_gray { (1, &luma) } else { (3, &rgb) };
        for d in [1usize, 2, 4, 8] {
            let out = decode(bytes, d as u32, ANY, false).unwrap_or_else(|e| panic!("case {i} at 1/{d}: {e}"));
            assert_eq!((out.width as usize, out.height as usize, out.channels), (w.div_ceil(d), h.div_ceil(d), ch), "case {i} 1/{d}");
            let want = box_down(w, h, ch, expected, d);
            let p = psnr(&out.pixels, &want);
            // Scaling averages away most of the compression noise, so the floor holds at every scale.
            assert!(p >= floor, "case {i} at 1/{d}: {p:.1} dB against the source (floor {floor})");
        }
    }
}

#[test]
fn full_size_matches_jpeg_decoder() {
    // Same IDCT maths up to rounding; chroma upsampling differs (jpeg-decoder interpolates).
    for (i, (bytes, min_psnr)) in
        [(PROGRESSIVE_444_RESTART, 45.0), (PROGRESSIVE_GRAY, 45.0), (PROGRESSIVE_420, 33.0), (BASELINE_422_RESTART, 33.0)]
            .into_iter()
            .enumerate()
    {
        let ours = decode(bytes, 1, ANY, false).unwrap();
        let theirs = reference(bytes);
        let p = psnr(&ours.pixels, &theirs);
        assert!(p >= min_psnr, "case {i}: {p:.1} dB against jpeg-decoder");
    }
}

#[test]
fn header_reads_metadata_without_decoding() {
    let h = read_header(PROGRESSIVE_420).unwrap();
    assert_eq!((h.width, h.height, h.progressive), (83, 61, true));
    assert_eq!(h.exif, None);
    // An ICC profile split over two APP2 chunks (given out of order) and an EXIF block.
    let mut bytes = vec![0xff, 0xd8];
    let profile: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    for (seq, part) in [(2u8, &profile[200..]), (1, &profile[..200])] {
        let mut seg = b"ICC_PROFILE\0".to_vec();
        seg.extend([seq, 2]);
        seg.extend(part);
        bytes.extend([0xff, 0xe2]);
        bytes.extend(((seg.len() + 2) as u16).to_be_bytes());
        bytes.extend(seg);
    }
    let exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\0";
    bytes.extend([0xff, 0xe1]);
    bytes.extend(((exif.len() + 2) as u16).to_be_bytes());
    bytes.extend(exif);
    bytes.extend(&BASELINE_422_RESTART[2..]);
    let h = read_header(&bytes).unwrap();
    assert_eq!(h.icc.as_deref(), Some(&profile[..]));
    assert_eq!(h.exif.as_deref(), Some(&exif[6..]));
    assert!(!h.progressive);
    // A missing chunk means no profile rather than a wrong one.
    let mut missing = vec![0xff, 0xd8, 0xff, 0xe2];
    let mut seg = b"ICC_PROFILE\0".to_vec();
    seg.extend([2u8, 2, 1, 2, 3]);
    missing.extend(((seg.len() + 2) as u16).to_be_bytes());
    missing.extend(seg);
    missing.extend(&BASELINE_422_RESTART[2..]);
    assert_eq!(read_header(&missing).unwrap().icc, None);
}

#[test]
fn truncated_data_decodes_what_is_there() {
    let (w, h, rgb) = source();
    for bytes in [PROGRESSIVE_420, BASELINE_422_RESTART] {
        let cut = &bytes[..bytes.len() * 2 / 3];
        let out = decode(cut, 1, ANY, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((out.width as usize, out.height as usize), (w, h));
        // The top rows are intact.
        let top = w * 3 * 8;
        assert!(psnr(&out.pixels[..top], &rgb[..top]) > 20.0);
    }
}

#[test]
fn hostile_bytes_give_typed_errors() {
    let corrupt = |r: Result<Decoded, ImagingError>| matches!(r, Err(ImagingError::Corrupt { .. }));
    assert!(corrupt(decode(b"not a jpeg", 1, ANY, false)));
    assert!(corrupt(decode(&[0xff, 0xd8, 0xff, 0xd9], 1, ANY, false)), "no scan");
    assert!(corrupt(decode(&[0xff, 0xd8, 0xff, 0xdb, 0x00], 1, ANY, false)), "truncated segment");
    // An arithmetic-coded frame header.
    let mut sof9 = BASELINE_422_RESTART.to_vec();
    let at = sof9.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    sof9[at + 1] = 0xc9;
    assert!(matches!(decode(&sof9, 1, ANY, false), Err(ImagingError::UnsupportedFormat(_))));
    // 12-bit samples.
    let mut twelve = BASELINE_422_RESTART.to_vec();
    twelve[at + 4] = 12;
    assert!(matches!(decode(&twelve, 1, ANY, false), Err(ImagingError::UnsupportedFormat(_))));
    // The budget is checked before buffers are allocated.
    assert!(matches!(decode(BASELINE_422_RESTART, 1, Budget { bytes: 1000, scans: 10 }, false), Err(ImagingError::LimitExceeded(_))));
    // So is the number of scans (this file has 10).
    assert!(decode(PROGRESSIVE_420, 2, Budget { bytes: u64::MAX, scans: 10 }, false).is_ok());
    assert!(matches!(decode(PROGRESSIVE_420, 2, Budget { bytes: u64::MAX, scans: 9 }, false), Err(ImagingError::LimitExceeded(_))));
    // Every prefix and many single-byte corruptions: an image or an error, never a panic.
    for bytes in [PROGRESSIVE_420, PROGRESSIVE_444_RESTART, BASELINE_422_RESTART, ADOBE_YCCK] {
        for len in (0..bytes.len()).step_by(37) {
            let _ = decode(&bytes[..len], 2, Budget { bytes: 1 << 24, scans: 64 }, false);
        }
        for i in (0..bytes.len()).step_by(11) {
            let mut bad = bytes.to_vec();
            bad[i] ^= 0x5a;
            let _ = decode(&bad, 1, Budget { bytes: 1 << 24, scans: 64 }, false);
            let _ = read_header(&bad);
        }
    }
}
