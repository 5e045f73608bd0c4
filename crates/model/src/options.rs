//! What to do with an image: the options a client asks for, as they travel from the upload
//! service through the job store to a worker.

use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Options that are out of range or cannot be parsed; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid options: {0}")]
pub struct BadOptions(pub String);

/// How the image fits a `width` × `height` box (the same words as CSS `object-fit` and sharp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Keep the aspect ratio and fit inside the box, padding to exactly the box size.
    #[default]
    Contain,
    /// Keep the aspect ratio and fill the box, cropping the overflow (centred).
    Cover,
    /// Stretch to exactly the box.
    Fill,
    /// Keep the aspect ratio and fit inside the box, without padding.
    Inside,
}

impl FromStr for Fit {
    type Err = BadOptions;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "contain" => Ok(Fit::Contain),
            "cover" => Ok(Fit::Cover),
            "fill" => Ok(Fit::Fill),
            "inside" => Ok(Fit::Inside),
            other => Err(BadOptions(format!("fit `{other}` is not one of contain, cover, fill, inside"))),
        }
    }
}

impl Fit {
    pub fn as_str(self) -> &'static str {
        match self {
            Fit::Contain => "contain",
            Fit::Cover => "cover",
            Fit::Fill => "fill",
            Fit::Inside => "inside",
        }
    }
}

/// Which part of the image `cover` keeps when it crops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gravity {
    #[default]
    Center,
    North,
    South,
    East,
    West,
    NorthEast,
    NorthWest,
    SouthEast,
    SouthWest,
}

impl Gravity {
    const ALL: [(Gravity, &'static str); 9] = [
        (Gravity::Center, "center"),
        (Gravity::North, "north"),
        (Gravity::South, "south"),
        (Gravity::East, "east"),
        (Gravity::West, "west"),
        (Gravity::NorthEast, "north-east"),
        (Gravity::NorthWest, "north-west"),
        (Gravity::SouthEast, "south-east"),
        (Gravity::SouthWest, "south-west"),
    ];

    pub fn as_str(self) -> &'static str {
        Gravity::ALL.iter().find(|(g, _)| *g == self).map(|(_, n)| *n).unwrap_or("center")
    }

    /// Where the kept window sits, from 0 (left/top) to 1 (right/bottom).
    pub fn anchor(self) -> (f64, f64) {
        match self {
            Gravity::Center => (0.5, 0.5),
            Gravity::North => (0.5, 0.0),
            Gravity::South => (0.5, 1.0),
            Gravity::East => (1.0, 0.5),
            Gravity::West => (0.0, 0.5),
            Gravity::NorthEast => (1.0, 0.0),
            Gravity::NorthWest => (0.0, 0.0),
            Gravity::SouthEast => (1.0, 1.0),
            Gravity::SouthWest => (0.0, 1.0),
        }
    }
}

impl FromStr for Gravity {
    type Err = BadOptions;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Gravity::ALL.iter().find(|(_, n)| *n == s).map(|(g, _)| *g).ok_or_else(|| {
            BadOptions(format!(
                "gravity `{s}` is not one of center, north, south, east, west, north-east, north-west, south-east, south-west"
            ))
        })
    }
}

/// Mirroring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flip {
    /// Left-right.
    H,
    /// Top-bottom.
    V,
    /// Both (the same as rotating by 180°).
    Hv,
}

impl FromStr for Flip {
    type Err = BadOptions;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "h" => Ok(Flip::H),
            "v" => Ok(Flip::V),
            "hv" | "vh" => Ok(Flip::Hv),
            other => Err(BadOptions(format!("flip `{other}` is not one of h, v, hv"))),
        }
    }
}

impl Flip {
    pub fn as_str(self) -> &'static str {
        match self {
            Flip::H => "h",
            Flip::V => "v",
            Flip::Hv => "hv",
        }
    }
}

/// A rectangle of the (oriented, rotated, flipped) source, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crop {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl FromStr for Crop {
    type Err = BadOptions;
    /// `x,y,width,height`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<Option<u32>> = s.split(',').map(|p| p.trim().parse().ok()).collect();
        match parts.as_slice() {
            [Some(x), Some(y), Some(width), Some(height)] if *width > 0 && *height > 0 => {
                Ok(Crop { x: *x, y: *y, width: *width, height: *height })
            }
            _ => Err(BadOptions(format!("crop `{s}` must be x,y,width,height with width and height above 0"))),
        }
    }
}

/// The output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
    /// WebP: lossy, or lossless with [`Options::lossless`].
    Webp,
    /// The input's format when pixmesh can encode it (JPEG, PNG, WebP), PNG otherwise.
    #[default]
    Same,
    /// JPEG, or PNG for an image with an alpha channel: what `format=auto` leaves when the
    /// uploader does not accept WebP (when it does, the upload service asks for WebP instead).
    Auto,
}

impl FromStr for OutputFormat {
    type Err = BadOptions;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
            "png" => Ok(OutputFormat::Png),
            "webp" => Ok(OutputFormat::Webp),
            "same" => Ok(OutputFormat::Same),
            "auto" => Ok(OutputFormat::Auto),
            other => Err(BadOptions(format!("format `{other}` is not one of jpeg, png, webp, same, auto"))),
        }
    }
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Png => "png",
            OutputFormat::Webp => "webp",
            OutputFormat::Same => "same",
            OutputFormat::Auto => "auto",
        }
    }
}

/// The operations of one job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default)]
    pub fit: Fit,
    #[serde(default)]
    pub format: OutputFormat,
    /// 1..=100; `None` means 80 (JPEG and lossy WebP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// Allow the output to be larger than the input.
    #[serde(default)]
    pub enlarge: bool,
    /// WebP only: encode losslessly (`quality` then trades speed for size).
    #[serde(default)]
    pub lossless: bool,
    /// Which part `cover` keeps.
    #[serde(default)]
    pub gravity: Gravity,
    /// Clockwise rotation after EXIF orientation: 0, 90, 180 or 270.
    #[serde(default)]
    pub rotate: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<Flip>,
    /// Applied after rotate and flip, before resizing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<Crop>,
    #[serde(default)]
    pub grayscale: bool,
    /// Gaussian blur sigma in output pixels (0.3–100); `None` for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur: Option<f32>,
    /// Unsharp-mask sigma in output pixels (0.3–10); `None` for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharpen: Option<f32>,
    /// The format was chosen from the uploader's `Accept` (`format=auto`): its results are
    /// served with `Vary: Accept`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub negotiated: bool,
}

/// Largest output side pixmesh will produce.
pub const MAX_OUTPUT_SIDE: u32 = 16_384;

impl Options {
    /// Checks ranges; the error message says what is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), BadOptions> {
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = value
                && (v == 0 || v > MAX_OUTPUT_SIDE)
            {
                return Err(BadOptions(format!("{name} must be between 1 and {MAX_OUTPUT_SIDE}, got {v}")));
            }
        }
        if let Some(q) = self.quality
            && !(1..=100).contains(&q)
        {
            return Err(BadOptions(format!("quality must be between 1 and 100, got {q}")));
        }
        if !matches!(self.rotate, 0 | 90 | 180 | 270) {
            return Err(BadOptions(format!("rotate must be 0, 90, 180 or 270, got {}", self.rotate)));
        }
        for (name, value, max) in [("blur", self.blur, 100.0), ("sharpen", self.sharpen, 10.0)] {
            // NaN is outside every range; said explicitly, since `NaN > x` is false both ways.
            if let Some(v) = value
                && (!v.is_finite() || !(0.3..=max).contains(&v))
            {
                return Err(BadOptions(format!("{name} must be a number between 0.3 and {max}, got {v}")));
            }
        }
        if let Some(c) = self.crop
            && (c.width == 0 || c.height == 0)
        {
            return Err(BadOptions(format!("crop width and height must be above 0, got {}x{}", c.width, c.height)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_and_rejects_others() {
        assert_eq!("cover".parse::<Fit>().unwrap(), Fit::Cover);
        assert!("stretch".parse::<Fit>().unwrap_err().to_string().contains("contain, cover, fill, inside"));
        assert_eq!("jpg".parse::<OutputFormat>().unwrap(), OutputFormat::Jpeg);
        assert!("avif".parse::<OutputFormat>().is_err());
        assert_eq!("north-east".parse::<Gravity>().unwrap(), Gravity::NorthEast);
        assert!("up".parse::<Gravity>().is_err());
        assert_eq!("vh".parse::<Flip>().unwrap(), Flip::Hv);
        assert_eq!("1,2,30,40".parse::<Crop>().unwrap(), Crop { x: 1, y: 2, width: 30, height: 40 });
        for bad in ["1,2,3", "1,2,0,4", "a,b,c,d", ""] {
            assert!(bad.parse::<Crop>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validates_ranges() {
        let ok = Options { width: Some(800), quality: Some(80), ..Options::default() };
        assert!(ok.validate().is_ok());
        for bad in [
            Options { width: Some(0), ..Options::default() },
            Options { height: Some(MAX_OUTPUT_SIDE + 1), ..Options::default() },
            Options { quality: Some(0), ..Options::default() },
            Options { quality: Some(101), ..Options::default() },
            Options { rotate: 45, ..Options::default() },
            Options { blur: Some(0.1), ..Options::default() },
            Options { sharpen: Some(50.0), ..Options::default() },
            Options { blur: Some(f32::NAN), ..Options::default() },
            Options { blur: Some(f32::INFINITY), ..Options::default() },
            Options { blur: Some(-1.0), ..Options::default() },
            Options { blur: Some(1e9), ..Options::default() },
            Options { sharpen: Some(f32::NAN), ..Options::default() },
            Options { sharpen: Some(f32::NEG_INFINITY), ..Options::default() },
            Options { sharpen: Some(-0.5), ..Options::default() },
            Options { crop: Some(Crop { x: 0, y: 0, width: 0, height: 5 }), ..Options::default() },
            Options { crop: Some(Crop { x: 0, y: 0, width: 5, height: 0 }), ..Options::default() },
        ] {
            assert!(matches!(bad.validate(), Err(BadOptions(_))), "{bad:?}");
        }
        let edges = Options { blur: Some(0.3), sharpen: Some(10.0), crop: Some(Crop { x: 0, y: 0, width: 1, height: 1 }), ..ok };
        assert!(edges.validate().is_ok());
    }
}
