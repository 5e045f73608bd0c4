//! The `Process` contract's operations on the wire (`pixmesh.v1.Operations`) and pipeline
//! [`Options`], both directions in one place so a new option cannot be added to one side only
//! (the round-trip test below fails if it is).

use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_imaging::{Crop, Fit, Flip, Gravity, Options, OutputFormat};
use pixmesh_proto::v1::Operations;

/// Options as the distributor sends them to a worker.
pub fn to_wire(o: &Options) -> Operations {
    Operations {
        width: o.width.unwrap_or(0),
        height: o.height.unwrap_or(0),
        fit: o.fit.as_str().into(),
        format: o.format.as_str().into(),
        quality: o.quality.map(u32::from).unwrap_or(0),
        enlarge: o.enlarge,
        lossless: o.lossless,
        gravity: o.gravity.as_str().into(),
        rotate: u32::from(o.rotate),
        flip: o.flip.map(|f| f.as_str().to_string()).unwrap_or_default(),
        crop: o.crop.map(|c| pixmesh_proto::v1::Crop { x: c.x, y: c.y, width: c.width, height: c.height }),
        grayscale: o.grayscale,
        blur: o.blur.unwrap_or(0.0),
        sharpen: o.sharpen.unwrap_or(0.0),
    }
}

/// Reads the wire operations into pipeline options; bad values are a `bad_request`.
pub fn options_from(ops: Option<Operations>) -> Result<Options, ApiError> {
    let ops = ops.unwrap_or_default();
    let bad = |e: pixmesh_imaging::BadOptions| ApiError::new(ErrorCode::BadRequest, e.to_string());
    let fit: Fit = if ops.fit.is_empty() { Fit::default() } else { ops.fit.parse().map_err(bad)? };
    let format: OutputFormat = if ops.format.is_empty() { OutputFormat::default() } else { ops.format.parse().map_err(bad)? };
    let quality = match ops.quality {
        0 => None,
        q => {
            Some(u8::try_from(q).map_err(|_| ApiError::new(ErrorCode::BadRequest, format!("quality must be between 1 and 100, got {q}")))?)
        }
    };
    let gravity: Gravity = if ops.gravity.is_empty() { Gravity::default() } else { ops.gravity.parse().map_err(bad)? };
    let flip: Option<Flip> = if ops.flip.is_empty() { None } else { Some(ops.flip.parse().map_err(bad)?) };
    let rotate = u16::try_from(ops.rotate)
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, format!("rotate must be 0, 90, 180 or 270, got {}", ops.rotate)))?;
    let crop = ops.crop.map(|c| Crop { x: c.x, y: c.y, width: c.width, height: c.height });
    let options = Options {
        width: (ops.width > 0).then_some(ops.width),
        height: (ops.height > 0).then_some(ops.height),
        fit,
        format,
        quality,
        enlarge: ops.enlarge,
        lossless: ops.lossless,
        gravity,
        rotate,
        flip,
        crop,
        grayscale: ops.grayscale,
        // 0 is proto3's "not set"; every other value, NaN and negatives included, is the
        // client's and goes to `validate` (a `> 0.0` test here once let NaN through unseen).
        blur: sigma(ops.blur),
        sharpen: sigma(ops.sharpen),
        // How the format was chosen matters to the status service only.
        negotiated: false,
    };
    // The one set of rules, the same as for an upload's query string.
    options.validate().map_err(bad)?;
    Ok(options)
}

/// A sigma on the wire: 0 (the default) means none.
fn sigma(v: f32) -> Option<f32> {
    (v != 0.0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_survives_the_round_trip() {
        let all = Options {
            width: Some(800),
            height: Some(600),
            fit: Fit::Cover,
            format: OutputFormat::Webp,
            quality: Some(70),
            enlarge: true,
            lossless: true,
            gravity: Gravity::SouthWest,
            rotate: 270,
            flip: Some(Flip::Hv),
            crop: Some(Crop { x: 1, y: 2, width: 300, height: 400 }),
            grayscale: true,
            blur: Some(1.5),
            sharpen: Some(0.7),
            negotiated: false,
        };
        assert_eq!(options_from(Some(to_wire(&all))).unwrap(), all);
        assert_eq!(options_from(Some(to_wire(&Options::default()))).unwrap(), Options::default());
        assert_eq!(options_from(None).unwrap(), Options::default());
    }

    #[test]
    fn wire_options_are_validated() {
        let ok = options_from(Some(Operations { width: 800, format: "webp".into(), ..Operations::default() })).unwrap();
        assert_eq!((ok.width, ok.height, ok.format), (Some(800), None, OutputFormat::Webp));
        for bad in [
            Operations { fit: "stretch".into(), ..Operations::default() },
            Operations { format: "avif".into(), ..Operations::default() },
            Operations { quality: 101, ..Operations::default() },
            Operations { quality: 100_000, ..Operations::default() },
            Operations { blur: f32::NAN, ..Operations::default() },
            Operations { blur: -2.0, ..Operations::default() },
            Operations { blur: f32::INFINITY, ..Operations::default() },
            Operations { sharpen: f32::NAN, ..Operations::default() },
            Operations { sharpen: f32::NEG_INFINITY, ..Operations::default() },
            Operations { sharpen: 1e30, ..Operations::default() },
            Operations { crop: Some(pixmesh_proto::v1::Crop { x: 0, y: 0, width: 0, height: 10 }), ..Operations::default() },
        ] {
            let err = options_from(Some(bad.clone())).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }
}
