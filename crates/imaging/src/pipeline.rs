//! decode under limits → orient → resize → encode.

use crate::error::ImagingError;
use crate::options::Limits;
use crate::sniff::{Format, sniff};
use fast_image_resize as fir;
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::metadata::Orientation;
use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageEncoder, ImageError, ImageReader};
use pixmesh_model::options::{Fit, Flip, Options, OutputFormat};
use std::io::Cursor;

const DEFAULT_QUALITY: u8 = 80;

/// An encoded result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub format: Format,
}

/// What the header says, checked against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// Reads only the header: format, dimensions, limits. Allocates no pixel buffer.
pub fn probe(bytes: &[u8], limits: &Limits) -> Result<Probe, ImagingError> {
    let format = check_input(bytes, limits)?;
    if format == Format::Jpeg
        && let Ok(header) = crate::jpeg::read_header(bytes)
    {
        check_dimensions(Format::Jpeg, header.width, header.height, limits)?;
        return Ok(Probe { format, width: header.width, height: header.height });
    }
    let decoder = open(bytes, format, limits)?;
    let (width, height) = decoder.dimensions();
    Ok(Probe { format, width, height })
}

/// Decoded pixels, not yet oriented, with what the file says about them.
struct Source {
    img: DynamicImage,
    orientation: Orientation,
    icc: Option<Vec<u8>>,
}

/// Runs the whole pipeline on `bytes`.
pub fn process(bytes: &[u8], options: &Options, limits: &Limits) -> Result<Output, ImagingError> {
    options.validate()?;
    // The stages are spans (of the worker's call, when it runs there).
    let decoding = tracing::info_span!("decode", image.format = tracing::field::Empty, image.bytes = bytes.len()).entered();
    let format = check_input(bytes, limits)?;
    decoding.record("image.format", format.as_str());
    let source = match format {
        // pixmesh's own decoder, with shrink-on-load; the general one for what it does not cover
        // (arithmetic coding, 12-bit, lossless).
        Format::Jpeg => match decode_jpeg(bytes, options, limits, false) {
            Err(ImagingError::UnsupportedFormat(_)) => {
                check_jpeg_scans(bytes, limits)?;
                decode_generic(bytes, format, options, limits)?
            }
            // At full size zune-jpeg (through `image`) is faster, with its SIMD IDCT and
            // upsampling; pixmesh's decoder wins when it can reduce, and handles CMYK.
            Ok(None) => {
                check_jpeg_scans(bytes, limits)?;
                match decode_generic(bytes, format, options, limits) {
                    Ok(source) => source,
                    // zune-jpeg refuses files that libjpeg (libvips, Pillow, browsers) decode:
                    // an Adobe APP14 segment cut short, an unknown Adobe transform. pixmesh's
                    // decoder reads markers as libjpeg does (a bad APPn payload is ignored),
                    // so it decodes those at full size.
                    Err(generic @ (ImagingError::Corrupt { .. } | ImagingError::UnsupportedFeature { .. })) => {
                        match decode_jpeg(bytes, options, limits, true) {
                            Ok(Some(source)) => source,
                            _ => return Err(generic),
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(source)) => source,
            Err(e) => return Err(e),
        },
        _ => decode_generic(bytes, format, options, limits)?,
    };
    drop(decoding);
    let resizing = tracing::info_span!("resize", image.width = tracing::field::Empty, image.height = tracing::field::Empty).entered();
    let Source { mut img, orientation, icc } = source;
    img.apply_orientation(orientation);
    let img = geometry(img, options)?;

    let output_format = match options.format {
        OutputFormat::Jpeg => Format::Jpeg,
        OutputFormat::Png => Format::Png,
        OutputFormat::Webp => Format::Webp,
        OutputFormat::Same => match format {
            Format::Jpeg | Format::Png | Format::Webp => format,
            Format::Gif | Format::Bmp | Format::Tiff => Format::Png,
        },
        OutputFormat::Auto if img.color().has_alpha() => Format::Png,
        OutputFormat::Auto => Format::Jpeg,
    };
    let keep_alpha = img.color().has_alpha() && output_format != Format::Jpeg;
    // Checked before any output buffer exists (the upload service checked it too, from the header).
    let plan = Plan::new(img.width(), img.height(), options);
    let (out_w, out_h) = plan.canvas.unwrap_or((plan.width, plan.height));
    limits.check_output(out_w, out_h)?;
    let pixels = Pixels::from_image(img, keep_alpha);
    let mut resized = resize(&pixels, &plan)?;
    drop(pixels);
    if let Some(srgb) = icc.as_deref().and_then(|p| crate::color::to_srgb(&resized.data, resized.alpha, p)) {
        resized.data = srgb;
    }
    let framed = match plan.canvas {
        Some((cw, ch)) => pad(resized, cw, ch, output_format == Format::Jpeg),
        None => resized,
    };
    let framed = effects(framed, options);
    resizing.record("image.width", framed.width).record("image.height", framed.height);
    drop(resizing);
    let _encoding = tracing::info_span!("encode", image.format = output_format.as_str()).entered();
    let bytes = encode(&framed, output_format, options.quality, options.lossless)?;
    Ok(Output { bytes, width: framed.width, height: framed.height, format: output_format })
}

/// Refuses `options` on a `width` × `height` image when the output they ask for is above the
/// output limits, whatever the image's EXIF orientation turns out to be (a quarter turn changes
/// what `width=` scales), so that a request is refused from the header alone, before a job exists.
pub fn check_output(width: u32, height: u32, options: &Options, limits: &Limits) -> Result<(), ImagingError> {
    for (w, h) in [(width, height), (height, width)] {
        let (w, h) = if matches!(options.rotate, 90 | 270) { (h, w) } else { (w, h) };
        let (w, h) = match options.crop {
            Some(c) => (c.width.min(w).max(1), c.height.min(h).max(1)),
            None => (w, h),
        };
        let plan = Plan::new(w, h, options);
        let (ow, oh) = plan.canvas.unwrap_or((plan.width, plan.height));
        limits.check_output(ow, oh)?;
    }
    Ok(())
}

/// The source pixels each side needs (in stored orientation) for a good resample: twice the
/// output, or everything when an explicit crop is asked for (its region is only known after
/// decoding at full size).
fn source_needed((w, h): (u32, u32), orientation: Orientation, options: &Options) -> (u32, u32) {
    let swaps =
        matches!(orientation, Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH)
            ^ matches!(options.rotate, 90 | 270);
    let (ow, oh) = if swaps { (h, w) } else { (w, h) };
    let (need_w, need_h) = if options.crop.is_some() { (ow, oh) } else { Plan::new(ow, oh, options).source_needed(ow, oh) };
    if swaps { (need_h, need_w) } else { (need_w, need_h) }
}

/// The bytes a decoder may allocate for pixels and working buffers.
fn decode_budget(limits: &Limits) -> u64 {
    limits.max_pixels.saturating_mul(8).saturating_add(64 << 20)
}

/// JPEG with shrink-on-load: decoded at 1/2, 1/4 or 1/8 scale when the result still has at least
/// twice the output's pixels per side. `None` for a gray or colour (not CMYK) image needed at full
/// size, which the general decoder does faster, unless `always`.
fn decode_jpeg(bytes: &[u8], options: &Options, limits: &Limits, always: bool) -> Result<Option<Source>, ImagingError> {
    let header = crate::jpeg::read_header(bytes)?;
    let (w, h) = (header.width, header.height);
    check_dimensions(Format::Jpeg, w, h, limits)?;
    // A broken EXIF block must not fail the image: orientation then defaults to "as stored".
    let orientation = header.exif.as_deref().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
    let (need_w, need_h) = source_needed((w, h), orientation, options);
    let denominator = [8u32, 4, 2].into_iter().find(|d| w.div_ceil(*d) >= need_w && h.div_ceil(*d) >= need_h).unwrap_or(1);
    if denominator == 1 && header.components != 4 && !always {
        return Ok(None);
    }
    let budget = crate::jpeg::Budget { bytes: decode_budget(limits), scans: limits.max_scans };
    // CMYK with its own profile: converted through the profile (at the decoded, reduced size).
    let cmyk_profile = header.components == 4 && header.icc.as_deref().is_some_and(crate::color::is_cmyk);
    let decoded = crate::jpeg::decode(bytes, denominator, budget, cmyk_profile)?;
    let (dw, dh) = (decoded.width, decoded.height);
    let (pixels, icc) = match decoded.channels {
        4 => (crate::color::cmyk_to_srgb(&decoded.pixels, header.icc.as_deref()), None),
        _ => (decoded.pixels, header.icc),
    };
    let img = if decoded.channels == 1 {
        image::GrayImage::from_raw(dw, dh, pixels).map(DynamicImage::ImageLuma8)
    } else {
        image::RgbImage::from_raw(dw, dh, pixels).map(DynamicImage::ImageRgb8)
    };
    let img = img.ok_or_else(|| ImagingError::Corrupt { format: Format::Jpeg, reason: "decoded size does not match the header".into() })?;
    Ok(Some(Source { img, orientation, icc }))
}

/// Decodes a JPEG at `1/denominator` scale (1, 2, 4 or 8) with pixmesh's decoder, under
/// `limits`: gray or RGB pixels (CMYK converted by the ink formula), not oriented. For callers
/// that want the decoder alone (tools, benchmarks); `process` picks the scale itself.
pub fn decode_jpeg_scaled(bytes: &[u8], denominator: u32, limits: &Limits) -> Result<DynamicImage, ImagingError> {
    let header = crate::jpeg::read_header(bytes)?;
    check_dimensions(Format::Jpeg, header.width, header.height, limits)?;
    let budget = crate::jpeg::Budget { bytes: decode_budget(limits), scans: limits.max_scans };
    let decoded = crate::jpeg::decode(bytes, denominator, budget, false)?;
    let (w, h) = (decoded.width, decoded.height);
    let img = if decoded.channels == 1 {
        image::GrayImage::from_raw(w, h, decoded.pixels).map(DynamicImage::ImageLuma8)
    } else {
        image::RgbImage::from_raw(w, h, decoded.pixels).map(DynamicImage::ImageRgb8)
    };
    img.ok_or_else(|| ImagingError::Corrupt { format: Format::Jpeg, reason: "decoded size does not match the header".into() })
}

/// Every other format (and JPEG variants pixmesh's decoder does not cover), through `image`;
/// WebP with libwebp's scaled decoding.
fn decode_generic(bytes: &[u8], format: Format, options: &Options, limits: &Limits) -> Result<Source, ImagingError> {
    let mut decoder = open(bytes, format, limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // Likewise an unreadable ICC profile: the pixels are then taken as sRGB.
    let icc = decoder.icc_profile().ok().flatten();
    let (w, h) = decoder.dimensions();
    let scaled = if format == Format::Webp {
        let alpha = decoder.color_type().has_alpha();
        crate::webp_scaled::decode(bytes, (w, h), webp_target((w, h), source_needed((w, h), orientation, options)), alpha)
    } else {
        None
    };
    let img = match scaled {
        Some(img) => img,
        None => DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?,
    };
    Ok(Source { img, orientation, icc })
}

/// The size to have libwebp decode to: the smallest that keeps `need` (twice the output) in both
/// directions with the aspect ratio kept; the full size when shrinking would not save much.
fn webp_target((w, h): (u32, u32), (need_w, need_h): (u32, u32)) -> (u32, u32) {
    let f = (f64::from(need_w) / f64::from(w)).max(f64::from(need_h) / f64::from(h));
    if f > 0.75 {
        return (w, h);
    }
    (((f64::from(w) * f).ceil() as u32).clamp(1, w), ((f64::from(h) * f).ceil() as u32).clamp(1, h))
}

/// rotate → flip → crop, on the oriented image.
fn geometry(img: DynamicImage, o: &Options) -> Result<DynamicImage, ImagingError> {
    let img = match o.rotate {
        90 => img.rotate90(),
        180 => img.rotate180(),
        270 => img.rotate270(),
        _ => img,
    };
    let img = match o.flip {
        Some(Flip::H) => img.fliph(),
        Some(Flip::V) => img.flipv(),
        Some(Flip::Hv) => img.rotate180(),
        None => img,
    };
    match o.crop {
        None => Ok(img),
        Some(c) => {
            let fits =
                c.x.checked_add(c.width).is_some_and(|r| r <= img.width()) && c.y.checked_add(c.height).is_some_and(|b| b <= img.height());
            if !fits {
                return Err(ImagingError::BadOptions(format!(
                    "crop {},{},{},{} is outside the {}x{} image",
                    c.x,
                    c.y,
                    c.width,
                    c.height,
                    img.width(),
                    img.height()
                )));
            }
            Ok(img.crop_imm(c.x, c.y, c.width, c.height))
        }
    }
}

/// grayscale → blur → sharpen, on the resized pixels (cheap at output size).
fn effects(mut img: Pixels, o: &Options) -> Pixels {
    let channels = img.channels();
    if o.grayscale {
        for px in img.data.chunks_exact_mut(channels) {
            // Rec. 601 luma, as JPEG's own Y.
            let y = ((299 * u32::from(px[0]) + 587 * u32::from(px[1]) + 114 * u32::from(px[2]) + 500) / 1000) as u8;
            px[0] = y;
            px[1] = y;
            px[2] = y;
        }
    }
    for (sigma, sharpen) in [(o.blur, false), (o.sharpen, true)] {
        let Some(sigma) = sigma else { continue };
        let (w, h) = (img.width, img.height);
        let data = std::mem::take(&mut img.data);
        img.data = if img.alpha {
            match image::RgbaImage::from_raw(w, h, data) {
                Some(buf) if sharpen => image::imageops::unsharpen(&buf, sigma, 0).into_raw(),
                Some(buf) => image::imageops::blur(&buf, sigma).into_raw(),
                None => Vec::new(),
            }
        } else {
            match image::RgbImage::from_raw(w, h, data) {
                Some(buf) if sharpen => image::imageops::unsharpen(&buf, sigma, 0).into_raw(),
                Some(buf) => image::imageops::blur(&buf, sigma).into_raw(),
                None => Vec::new(),
            }
        };
    }
    img
}

/// Checks what can be checked before any decoding: size, format, scan and frame counts.
fn check_input(bytes: &[u8], limits: &Limits) -> Result<Format, ImagingError> {
    if bytes.len() > limits.max_input_bytes {
        return Err(ImagingError::InputTooLarge { bytes: bytes.len(), max_bytes: limits.max_input_bytes });
    }
    let format =
        sniff(bytes).ok_or_else(|| ImagingError::UnsupportedFormat("the bytes are not JPEG, PNG, WebP, GIF, BMP or TIFF".to_string()))?;
    // JPEG scans are counted by pixmesh's decoder as it meets them.
    let (what, count, max) = match format {
        Format::Gif => ("frames", crate::structure::gif_frames(bytes), limits.max_frames),
        Format::Webp => ("frames", crate::structure::webp_frames(bytes), limits.max_frames),
        _ => ("", 0, usize::MAX),
    };
    if count > max {
        return Err(ImagingError::LimitExceeded(format!("the {format} has {count} {what}; the limit is {max}")));
    }
    Ok(format)
}

/// The scan limit, for JPEGs that go to the general decoder.
fn check_jpeg_scans(bytes: &[u8], limits: &Limits) -> Result<(), ImagingError> {
    let scans = crate::structure::jpeg_scans(bytes);
    if scans > limits.max_scans {
        return Err(ImagingError::LimitExceeded(format!("the JPEG has {scans} scans; the limit is {}", limits.max_scans)));
    }
    Ok(())
}

fn open<'a>(bytes: &'a [u8], format: Format, limits: &Limits) -> Result<impl ImageDecoder + 'a, ImagingError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image_format());
    let mut decoder_limits = image::Limits::default();
    // Decoded pixels (up to 4 channels of 16 bits) plus working space.
    decoder_limits.max_alloc = Some(decode_budget(limits));
    // The side limit is checked here, not by the decoder: its refusal is a generic limit error
    // (`limit_exceeded`), while a header that is too large is `image_too_large` wherever it
    // is found. It is handed to the decoder afterwards, as a second line.
    reader.limits(decoder_limits.clone());
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(format, width, height, limits)?;
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder.set_limits(decoder_limits).map_err(|e| decode_error(format, e))?;
    Ok(decoder)
}

fn check_dimensions(format: Format, width: u32, height: u32, limits: &Limits) -> Result<(), ImagingError> {
    let pixels = u64::from(width) * u64::from(height);
    if width > limits.max_side || height > limits.max_side || pixels > limits.max_pixels {
        return Err(ImagingError::TooLarge { width, height, pixels, max_pixels: limits.max_pixels, max_side: limits.max_side });
    }
    if width == 0 || height == 0 {
        return Err(ImagingError::Corrupt { format, reason: format!("image has no pixels ({width}x{height})") });
    }
    Ok(())
}

fn decode_error(format: Format, err: ImageError) -> ImagingError {
    match err {
        ImageError::Limits(e) => ImagingError::LimitExceeded(e.to_string()),
        ImageError::Unsupported(e) => ImagingError::UnsupportedFeature { format, reason: e.to_string() },
        ImageError::Decoding(e) => ImagingError::Corrupt { format, reason: e.to_string() },
        ImageError::IoError(e) => ImagingError::Corrupt { format, reason: format!("truncated or unreadable data: {e}") },
        ImageError::Parameter(e) => ImagingError::Corrupt { format, reason: e.to_string() },
        ImageError::Encoding(e) => ImagingError::Corrupt { format, reason: e.to_string() },
    }
}

/// 8-bit interleaved pixels, RGB or RGBA.
struct Pixels {
    width: u32,
    height: u32,
    alpha: bool,
    data: Vec<u8>,
}

impl Pixels {
    fn from_image(img: DynamicImage, keep_alpha: bool) -> Pixels {
        let (width, height) = (img.width(), img.height());
        if keep_alpha {
            Pixels { width, height, alpha: true, data: img.into_rgba8().into_raw() }
        } else if img.color().has_alpha() {
            // JPEG has no alpha: composite over white rather than letting transparent pixels
            // turn black.
            let rgba = img.into_rgba8();
            let mut data = Vec::with_capacity(width as usize * height as usize * 3);
            for px in rgba.pixels() {
                let a = u16::from(px[3]);
                for c in 0..3 {
                    let v = (u16::from(px[c]) * a + 255 * (255 - a) + 127) / 255;
                    data.push(v as u8);
                }
            }
            Pixels { width, height, alpha: false, data }
        } else {
            Pixels { width, height, alpha: false, data: img.into_rgb8().into_raw() }
        }
    }

    fn pixel_type(&self) -> fir::PixelType {
        if self.alpha { fir::PixelType::U8x4 } else { fir::PixelType::U8x3 }
    }

    fn channels(&self) -> usize {
        if self.alpha { 4 } else { 3 }
    }
}

/// Where the pixels go: the resized size, an optional centred source crop (cover) and an
/// optional canvas to pad to (contain).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    width: u32,
    height: u32,
    crop: Option<(f64, f64, f64, f64)>,
    canvas: Option<(u32, u32)>,
}

fn scaled(side: u32, scale: f64) -> u32 {
    ((f64::from(side) * scale).round() as u32).max(1)
}

impl Plan {
    fn new(src_w: u32, src_h: u32, o: &Options) -> Plan {
        let (fw, fh) = (f64::from(src_w), f64::from(src_h));
        let cap = |scale: f64| if o.enlarge { scale } else { scale.min(1.0) };
        let keep = Plan { width: src_w, height: src_h, crop: None, canvas: None };
        match (o.width, o.height) {
            (None, None) => keep,
            (Some(w), None) => {
                let s = cap(f64::from(w) / fw);
                Plan { width: scaled(src_w, s), height: scaled(src_h, s), ..keep }
            }
            (None, Some(h)) => {
                let s = cap(f64::from(h) / fh);
                Plan { width: scaled(src_w, s), height: scaled(src_h, s), ..keep }
            }
            (Some(w), Some(h)) => match o.fit {
                Fit::Fill => {
                    let (w, h) = if o.enlarge { (w, h) } else { (w.min(src_w), h.min(src_h)) };
                    Plan { width: w, height: h, ..keep }
                }
                Fit::Inside | Fit::Contain => {
                    let s = cap((f64::from(w) / fw).min(f64::from(h) / fh));
                    let canvas = (o.fit == Fit::Contain).then_some((w, h));
                    Plan { width: scaled(src_w, s).min(w), height: scaled(src_h, s).min(h), canvas, ..keep }
                }
                Fit::Cover => {
                    // Without enlargement, shrink the box (same aspect) until it fits the source.
                    let shrink = if o.enlarge { 1.0 } else { (fw / f64::from(w)).min(fh / f64::from(h)).min(1.0) };
                    let (bw, bh) = (scaled(w, shrink), scaled(h, shrink));
                    let target_aspect = f64::from(bw) / f64::from(bh);
                    let (cw, ch) = if fw / fh > target_aspect { (fh * target_aspect, fh) } else { (fw, fw / target_aspect) };
                    let (ax, ay) = o.gravity.anchor();
                    let crop = Some(((fw - cw) * ax, (fh - ch) * ay, cw, ch));
                    Plan { width: bw, height: bh, crop, canvas: None }
                }
            },
        }
    }
}

impl Plan {
    /// The smallest source size that still gives a good resample: twice the output across the
    /// region that is kept (the whole image, or the cover crop).
    fn source_needed(&self, src_w: u32, src_h: u32) -> (u32, u32) {
        let (region_w, region_h) = self.crop.map(|(_, _, w, h)| (w, h)).unwrap_or((f64::from(src_w), f64::from(src_h)));
        let need = |out: u32, region: f64, full: u32| ((2.0 * f64::from(out) * f64::from(full) / region).ceil() as u32).min(full);
        (need(self.width, region_w, src_w), need(self.height, region_h, src_h))
    }
}

fn resize(src: &Pixels, plan: &Plan) -> Result<Pixels, ImagingError> {
    if plan.width == src.width && plan.height == src.height && plan.crop.is_none() {
        return Ok(Pixels { width: src.width, height: src.height, alpha: src.alpha, data: src.data.clone() });
    }
    let internal = |e: &dyn std::fmt::Display| ImagingError::LimitExceeded(format!("resize failed: {e}"));
    let src_view = fir::images::ImageRef::new(src.width, src.height, &src.data, src.pixel_type()).map_err(|e| internal(&e))?;
    let mut dst = fir::images::Image::new(plan.width, plan.height, src.pixel_type());
    let mut opts = fir::ResizeOptions::new().resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3));
    if let Some((left, top, w, h)) = plan.crop {
        opts = opts.crop(left, top, w, h);
    }
    fir::Resizer::new().resize(&src_view, &mut dst, &opts).map_err(|e| internal(&e))?;
    Ok(Pixels { width: plan.width, height: plan.height, alpha: src.alpha, data: dst.into_vec() })
}

/// Centres `img` on a `cw` × `ch` canvas: white for JPEG, transparent otherwise.
fn pad(img: Pixels, cw: u32, ch: u32, opaque: bool) -> Pixels {
    if img.width == cw && img.height == ch {
        return img;
    }
    let alpha = !opaque;
    let channels = if alpha { 4 } else { 3 };
    let background: &[u8] = if alpha { &[0, 0, 0, 0] } else { &[255, 255, 255] };
    let mut data = background.repeat(cw as usize * ch as usize);
    let (x0, y0) = ((cw - img.width) / 2, (ch - img.height) / 2);
    let src_channels = img.channels();
    for y in 0..img.height as usize {
        for x in 0..img.width as usize {
            let s = (y * img.width as usize + x) * src_channels;
            let d = ((y + y0 as usize) * cw as usize + x + x0 as usize) * channels;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
            if alpha {
                data[d + 3] = if src_channels == 4 { img.data[s + 3] } else { 255 };
            }
        }
    }
    Pixels { width: cw, height: ch, alpha, data }
}

fn encode(img: &Pixels, format: Format, quality: Option<u8>, lossless: bool) -> Result<Vec<u8>, ImagingError> {
    let fail = |reason: String| ImagingError::Encode { format: format.as_str(), reason };
    let quality = quality.unwrap_or(DEFAULT_QUALITY);
    match format {
        Format::Jpeg => {
            let (w, h) = (u16::try_from(img.width), u16::try_from(img.height));
            let (Ok(w), Ok(h)) = (w, h) else {
                return Err(fail(format!("{}x{} is larger than JPEG allows (65535 per side)", img.width, img.height)));
            };
            let mut out = Vec::with_capacity(img.data.len() / 10);
            let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
            // 4:2:0 chroma, as every photo JPEG encoder does by default, box-averaged like
            // libjpeg (the encoder's default takes the top-left pixel of each 2x2 block, which
            // costs 1.3 dB of PSNR at the same size); optimized Huffman tables cost little at
            // thumbnail sizes and save a few percent of bytes.
            encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
            encoder.set_chroma_subsampling_method(jpeg_encoder::ChromaSubsamplingMethod::Average);
            encoder.set_optimized_huffman_tables(true);
            let color = if img.alpha { jpeg_encoder::ColorType::Rgba } else { jpeg_encoder::ColorType::Rgb };
            encoder.encode(&img.data, w, h, color).map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        Format::Webp => {
            let encoder = if img.alpha {
                webp::Encoder::from_rgba(&img.data, img.width, img.height)
            } else {
                webp::Encoder::from_rgb(&img.data, img.width, img.height)
            };
            let memory = encoder.encode_simple(lossless, f32::from(quality)).map_err(|e| fail(format!("{e:?}")))?;
            Ok(memory.to_vec())
        }
        _ => {
            let color = if img.alpha { ExtendedColorType::Rgba8 } else { ExtendedColorType::Rgb8 };
            let mut out = Vec::with_capacity(img.data.len() / 4);
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Adaptive)
                .write_image(&img.data, img.width, img.height, color)
                .map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128]))
    }

    fn encode_test(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn decode(bytes: &[u8]) -> DynamicImage {
        image::load_from_memory(bytes).unwrap()
    }

    fn opts(w: Option<u32>, h: Option<u32>, fit: Fit, format: OutputFormat) -> Options {
        Options { width: w, height: h, fit, format, ..Options::default() }
    }

    #[test]
    fn output_limits_refuse_huge_requests_from_the_header() {
        let limits = Limits { max_output_pixels: 16_000_000, max_output_side: 8192, ..Limits::default() };
        let huge = Options { width: Some(16_384), height: Some(16_384), enlarge: true, fit: Fit::Fill, ..Options::default() };
        let err = check_output(64, 64, &huge, &limits).unwrap_err();
        assert_eq!(err.code(), "image_too_large");
        assert!(err.to_string().contains("16384x16384"), "{err}");
        // Without enlargement the output stays at the input's size: fine.
        assert!(check_output(64, 64, &Options { enlarge: false, ..huge }, &limits).is_ok());
        // width= on a tall image scales its height too; a quarter turn (EXIF or rotate=) is
        // counted either way.
        let wide = Options { width: Some(8000), enlarge: true, ..Options::default() };
        assert!(check_output(10, 1000, &wide, &limits).is_err(), "8000 x 800,000 is refused");
        assert!(check_output(1000, 10, &wide, &limits).is_err(), "the same image turned by its EXIF orientation");
        assert!(check_output(100, 100, &Options { width: Some(4000), enlarge: true, ..Options::default() }, &limits).is_ok());
        // A side over the limit alone is refused too.
        let long = Options { width: Some(9000), height: Some(10), fit: Fit::Fill, enlarge: true, ..Options::default() };
        assert!(check_output(100, 100, &long, &limits).is_err());
        // And the pipeline itself refuses, before allocating the output.
        let src = encode_test(&DynamicImage::ImageRgb8(gradient(16, 16)), image::ImageFormat::Png);
        let err = process(&src, &huge, &limits).unwrap_err();
        assert_eq!(err.code(), "image_too_large");
    }

    #[test]
    fn plans_follow_fit_modes() {
        let check = |o: Options, expected: (u32, u32, Option<(u32, u32)>)| {
            let p = Plan::new(400, 200, &o);
            assert_eq!((p.width, p.height, p.canvas), expected, "{o:?}");
        };
        check(opts(Some(100), None, Fit::Contain, OutputFormat::Same), (100, 50, None));
        check(opts(None, Some(50), Fit::Contain, OutputFormat::Same), (100, 50, None));
        check(opts(Some(100), Some(100), Fit::Inside, OutputFormat::Same), (100, 50, None));
        check(opts(Some(100), Some(100), Fit::Contain, OutputFormat::Same), (100, 50, Some((100, 100))));
        check(opts(Some(100), Some(100), Fit::Cover, OutputFormat::Same), (100, 100, None));
        check(opts(Some(100), Some(100), Fit::Fill, OutputFormat::Same), (100, 100, None));
        // Never enlarge unless asked.
        check(opts(Some(800), None, Fit::Contain, OutputFormat::Same), (400, 200, None));
        check(Options { width: Some(800), enlarge: true, ..Options::default() }, (800, 400, None));
        check(opts(Some(800), Some(800), Fit::Cover, OutputFormat::Same), (200, 200, None));
    }

    #[test]
    fn resizes_and_converts_formats() {
        let src = encode_test(&DynamicImage::ImageRgb8(gradient(64, 48)), image::ImageFormat::Png);
        for (format, expected) in [
            (OutputFormat::Jpeg, Format::Jpeg),
            (OutputFormat::Webp, Format::Webp),
            (OutputFormat::Png, Format::Png),
            (OutputFormat::Same, Format::Png),
        ] {
            let out = process(&src, &opts(Some(32), None, Fit::Contain, format), &Limits::default()).unwrap();
            assert_eq!((out.width, out.height, out.format), (32, 24, expected));
            assert_eq!(sniff(&out.bytes), Some(expected));
            let back = decode(&out.bytes);
            assert_eq!((back.width(), back.height()), (32, 24));
        }
    }

    #[test]
    fn contain_pads_to_the_box() {
        let src = encode_test(&DynamicImage::ImageRgb8(gradient(64, 32)), image::ImageFormat::Png);
        let out = process(&src, &opts(Some(40), Some(40), Fit::Contain, OutputFormat::Png), &Limits::default()).unwrap();
        let back = decode(&out.bytes).into_rgba8();
        assert_eq!(back.dimensions(), (40, 40));
        assert_eq!(back.get_pixel(20, 0)[3], 0, "padding is transparent");
        assert_eq!(back.get_pixel(20, 20)[3], 255, "image is opaque");
    }

    #[test]
    fn transparent_to_jpeg_is_composited_on_white() {
        let img = image::RgbaImage::from_pixel(8, 8, image::Rgba([0, 0, 0, 0]));
        let src = encode_test(&DynamicImage::ImageRgba8(img), image::ImageFormat::Png);
        let out = process(&src, &opts(None, None, Fit::Contain, OutputFormat::Jpeg), &Limits::default()).unwrap();
        let px = decode(&out.bytes).into_rgb8().get_pixel(4, 4).0;
        assert!(px.iter().all(|&c| c > 240), "{px:?}");
    }

    #[test]
    fn limits_are_checked_from_the_header() {
        let src = encode_test(&DynamicImage::ImageRgb8(gradient(300, 200)), image::ImageFormat::Png);
        let tight = Limits { max_pixels: 10_000, ..Limits::default() };
        let err = process(&src, &Options::default(), &tight).unwrap_err();
        assert!(matches!(err, ImagingError::TooLarge { width: 300, height: 200, .. }), "{err:?}");
        // A side over the limit is `image_too_large` (not the decoder's generic limit error), in
        // every format.
        let narrow = Limits { max_side: 250, ..Limits::default() };
        for format in
            [image::ImageFormat::Png, image::ImageFormat::Gif, image::ImageFormat::Bmp, image::ImageFormat::WebP, image::ImageFormat::Jpeg]
        {
            let src = encode_test(&DynamicImage::ImageRgb8(gradient(300, 200)), format);
            let err = probe(&src, &narrow).unwrap_err();
            assert!(matches!(err, ImagingError::TooLarge { width: 300, height: 200, .. }), "{format:?}: {err:?}");
            assert_eq!(err.code(), "image_too_large");
            assert!(matches!(process(&src, &Options::default(), &narrow), Err(ImagingError::TooLarge { .. })), "{format:?}");
        }
        let small_input = Limits { max_input_bytes: 10, ..Limits::default() };
        assert!(matches!(process(&src, &Options::default(), &small_input), Err(ImagingError::InputTooLarge { .. })));
    }

    #[test]
    fn too_many_scans_are_refused_from_the_structure() {
        let jpeg = encode_test(&DynamicImage::ImageRgb8(gradient(16, 16)), image::ImageFormat::Jpeg);
        let limits = Limits { max_scans: 0, ..Limits::default() };
        let err = process(&jpeg, &Options::default(), &limits).unwrap_err();
        assert!(matches!(err, ImagingError::LimitExceeded(ref m) if m.contains("scans")), "{err}");
    }

    #[test]
    fn hostile_bytes_give_typed_errors() {
        let png = encode_test(&DynamicImage::ImageRgb8(gradient(64, 64)), image::ImageFormat::Png);
        let jpeg = encode_test(&DynamicImage::ImageRgb8(gradient(64, 64)), image::ImageFormat::Jpeg);
        let check = |bytes: &[u8]| match process(bytes, &Options::default(), &Limits::default()) {
            Err(ImagingError::UnsupportedFormat(_)) | Err(ImagingError::Corrupt { .. }) | Err(ImagingError::LimitExceeded(_)) => {}
            // A truncated JPEG may still decode (missing rows become grey); that is a result.
            Ok(out) => assert!(sniff(&out.bytes).is_some()),
            Err(other) => panic!("unexpected error {other:?}"),
        };
        check(b"not an image at all");
        check(&png[..png.len() / 2]);
        check(&png[..40]);
        check(&jpeg[..jpeg.len() / 3]);
        let mut flipped = png.clone();
        for b in flipped.iter_mut().skip(60).step_by(7) {
            *b ^= 0x5a;
        }
        check(&flipped);
        assert!(matches!(process(b"<svg/>", &Options::default(), &Limits::default()), Err(ImagingError::UnsupportedFormat(_))));
    }

    #[test]
    fn format_auto_is_jpeg_for_an_opaque_image_and_png_for_one_with_alpha() {
        let auto = Options { format: OutputFormat::Auto, ..Options::default() };
        let opaque = encode_test(&DynamicImage::ImageRgb8(gradient(16, 8)), image::ImageFormat::Png);
        assert_eq!(process(&opaque, &auto, &Limits::default()).unwrap().format, Format::Jpeg);
        let alpha = encode_test(&DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(gradient(16, 8)).into_rgba8()), image::ImageFormat::Png);
        assert_eq!(process(&alpha, &auto, &Limits::default()).unwrap().format, Format::Png);
    }

    #[test]
    fn geometry_and_effects() {
        let src = encode_test(&DynamicImage::ImageRgb8(gradient(64, 32)), image::ImageFormat::Png);
        let run = |o: Options| {
            let out = process(&src, &Options { format: OutputFormat::Png, ..o }, &Limits::default()).unwrap();
            decode(&out.bytes).into_rgb8()
        };
        let plain = run(Options::default());
        let rotated = run(Options { rotate: 90, ..Options::default() });
        assert_eq!(rotated.dimensions(), (32, 64));
        // Rotating 90° clockwise moves the top-left pixel to the top-right.
        assert_eq!(rotated.get_pixel(31, 0), plain.get_pixel(0, 0));
        let flipped = run(Options { flip: Some(Flip::H), ..Options::default() });
        assert_eq!(flipped.get_pixel(0, 5), plain.get_pixel(63, 5));
        let cropped = run(Options { crop: Some(crate::Crop { x: 10, y: 4, width: 20, height: 8 }), ..Options::default() });
        assert_eq!(cropped.dimensions(), (20, 8));
        assert_eq!(cropped.get_pixel(0, 0), plain.get_pixel(10, 4));
        let err = process(
            &src,
            &Options { crop: Some(crate::Crop { x: 60, y: 0, width: 10, height: 10 }), ..Options::default() },
            &Limits::default(),
        );
        assert!(matches!(err, Err(ImagingError::BadOptions(_))));
        let gray = run(Options { grayscale: true, ..Options::default() });
        assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        let blurred = run(Options { blur: Some(3.0), ..Options::default() });
        let sharpened = run(Options { sharpen: Some(1.0), ..Options::default() });
        assert_eq!((blurred.dimensions(), sharpened.dimensions()), ((64, 32), (64, 32)));
        assert_ne!(blurred, plain);
    }

    #[test]
    fn cover_gravity_picks_the_kept_window() {
        // Left half black, right half white: cover to a square keeps one side by gravity.
        let img = image::RgbImage::from_fn(80, 20, |x, _| if x < 40 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) });
        let src = encode_test(&DynamicImage::ImageRgb8(img), image::ImageFormat::Png);
        let run = |g: crate::Gravity| {
            let o =
                Options { width: Some(10), height: Some(10), fit: Fit::Cover, format: OutputFormat::Png, gravity: g, ..Options::default() };
            decode(&process(&src, &o, &Limits::default()).unwrap().bytes).into_rgb8().get_pixel(5, 5)[0]
        };
        assert!(run(crate::Gravity::West) < 20);
        assert!(run(crate::Gravity::East) > 235);
    }

    #[test]
    fn embedded_profiles_are_converted_to_srgb() {
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([200, 100, 50]));
        let mut tagged = Vec::new();
        let mut encoder = image::codecs::png::PngEncoder::new(&mut tagged);
        encoder.set_icc_profile(moxcms::ColorProfile::new_display_p3().encode().unwrap()).unwrap();
        encoder.write_image(img.as_raw(), 16, 16, ExtendedColorType::Rgb8).unwrap();
        let untagged = encode_test(&DynamicImage::ImageRgb8(img), image::ImageFormat::Png);
        let o = Options { format: OutputFormat::Png, ..Options::default() };
        let plain = decode(&process(&untagged, &o, &Limits::default()).unwrap().bytes).into_rgb8();
        let converted = decode(&process(&tagged, &o, &Limits::default()).unwrap().bytes).into_rgb8();
        assert_eq!(plain.get_pixel(8, 8).0, [200, 100, 50], "untagged pixels are taken as sRGB");
        let px = converted.get_pixel(8, 8).0;
        assert!(px[0] > 200 && px[2] < 50, "P3 orange maps to a more saturated sRGB orange: {px:?}");
    }

    /// Inserts an EXIF APP1 segment with the given orientation right after the JPEG SOI marker.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"II*\0");
        tiff.extend_from_slice(&8u32.to_le_bytes()); // first IFD offset
        tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_le_bytes()); // count
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        let mut payload = b"Exif\0\0".to_vec();
        payload.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        let jpeg = encode_test(&DynamicImage::ImageRgb8(gradient(64, 32)), image::ImageFormat::Jpeg);
        let rotated = with_exif_orientation(&jpeg, 6); // rotate 90° clockwise to display
        let out = process(&rotated, &Options { format: OutputFormat::Png, ..Options::default() }, &Limits::default()).unwrap();
        assert_eq!((out.width, out.height), (32, 64));
        let plain = process(&jpeg, &Options { format: OutputFormat::Png, ..Options::default() }, &Limits::default()).unwrap();
        assert_eq!((plain.width, plain.height), (64, 32));
    }
}
