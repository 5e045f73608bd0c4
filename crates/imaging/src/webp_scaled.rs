//! WebP decoding through libwebp, with shrink-on-load: libwebp can scale while it decodes, so a
//! 4096² photo made into an 800 px thumbnail never exists at full size in memory.
//!
//! This is the one module with `unsafe`: the `webp` crate has no safe API for decoder options
//! (scaling, external output buffers), so we call libwebp's `WebPDecode` through `libwebp-sys`.

#![allow(unsafe_code)]

use image::DynamicImage;
use libwebp_sys as sys;

/// Decodes `bytes` (a still WebP of `width`×`height`) to `out_w`×`out_h` pixels, RGB or RGBA.
/// `None` if libwebp refuses the data (the caller then falls back to the generic decoder, which
/// reports a typed error).
pub(crate) fn decode(bytes: &[u8], (width, height): (u32, u32), (out_w, out_h): (u32, u32), alpha: bool) -> Option<DynamicImage> {
    if out_w == 0 || out_h == 0 || out_w > width || out_h > height {
        return None;
    }
    let channels: usize = if alpha { 4 } else { 3 };
    let stride = out_w as usize * channels;
    let mut pixels = vec![0u8; stride.checked_mul(out_h as usize)?];
    let mut config = sys::WebPDecoderConfig::new().ok()?;
    config.output.colorspace = if alpha { sys::WEBP_CSP_MODE::MODE_RGBA } else { sys::WEBP_CSP_MODE::MODE_RGB };
    config.output.is_external_memory = 1;
    config.output.u.RGBA = sys::WebPRGBABuffer { rgba: pixels.as_mut_ptr(), stride: i32::try_from(stride).ok()?, size: pixels.len() };
    if (out_w, out_h) != (width, height) {
        config.options.use_scaling = 1;
        config.options.scaled_width = i32::try_from(out_w).ok()?;
        config.options.scaled_height = i32::try_from(out_h).ok()?;
    }
    // SAFETY: `bytes` is a live slice for the whole call and libwebp only reads `bytes.len()`
    // bytes of it. The output buffer is external memory that we own: `pixels` is exactly
    // `stride * out_h` bytes, which is what libwebp checks `size` against before writing, and it
    // outlives the call. `config` was initialised by `WebPInitDecoderConfig` (inside `new`).
    let status = unsafe { sys::WebPDecode(bytes.as_ptr(), bytes.len(), &mut config) };
    // SAFETY: frees only what libwebp allocated itself inside `config.output`; with external
    // memory that is nothing, and our `pixels` are not touched.
    unsafe { sys::WebPFreeDecBuffer(&mut config.output) };
    if status != sys::VP8StatusCode::VP8_STATUS_OK {
        return None;
    }
    if alpha {
        image::RgbaImage::from_raw(out_w, out_h, pixels).map(DynamicImage::ImageRgba8)
    } else {
        image::RgbImage::from_raw(out_w, out_h, pixels).map(DynamicImage::ImageRgb8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webp(w: u32, h: u32, alpha: bool) -> Vec<u8> {
        let channels = if alpha { 4 } else { 3 };
        let data: Vec<u8> = (0..w * h * channels).map(|i| (i % 251) as u8).collect();
        let encoder = if alpha { webp::Encoder::from_rgba(&data, w, h) } else { webp::Encoder::from_rgb(&data, w, h) };
        encoder.encode(90.0).to_vec()
    }

    #[test]
    fn decodes_scaled_and_full() {
        for alpha in [false, true] {
            let bytes = webp(200, 100, alpha);
            let full = decode(&bytes, (200, 100), (200, 100), alpha).unwrap();
            assert_eq!((full.width(), full.height(), full.color().has_alpha()), (200, 100, alpha));
            let small = decode(&bytes, (200, 100), (50, 25), alpha).unwrap();
            assert_eq!((small.width(), small.height()), (50, 25));
        }
    }

    #[test]
    fn refuses_garbage_and_bad_sizes() {
        let bytes = webp(20, 10, false);
        assert!(decode(&bytes[..bytes.len() / 2], (20, 10), (10, 5), false).is_none());
        assert!(decode(b"RIFF\0\0\0\0WEBPVP8 garbage", (20, 10), (10, 5), false).is_none());
        assert!(decode(&bytes, (20, 10), (40, 20), false).is_none(), "no upscaling here");
        assert!(decode(&bytes, (20, 10), (0, 5), false).is_none());
    }
}
