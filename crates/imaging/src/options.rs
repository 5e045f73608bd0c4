//! What to do with an image, and the limits under which untrusted bytes are read.

use crate::error::ImagingError;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

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
    type Err = ImagingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "contain" => Ok(Fit::Contain),
            "cover" => Ok(Fit::Cover),
            "fill" => Ok(Fit::Fill),
            "inside" => Ok(Fit::Inside),
            other => Err(ImagingError::BadOptions(format!("fit `{other}` is not one of contain, cover, fill, inside"))),
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
}

impl FromStr for OutputFormat {
    type Err = ImagingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
            "png" => Ok(OutputFormat::Png),
            "webp" => Ok(OutputFormat::Webp),
            "same" => Ok(OutputFormat::Same),
            other => Err(ImagingError::BadOptions(format!("format `{other}` is not one of jpeg, png, webp, same"))),
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
        }
    }
}

/// The operations of one job.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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
}

/// Largest output side pixmesh will produce.
pub const MAX_OUTPUT_SIDE: u32 = 16_384;

impl Options {
    /// Checks ranges; the error message says what is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), ImagingError> {
        for (name, value) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = value
                && (v == 0 || v > MAX_OUTPUT_SIDE)
            {
                return Err(ImagingError::BadOptions(format!("{name} must be between 1 and {MAX_OUTPUT_SIDE}, got {v}")));
            }
        }
        if let Some(q) = self.quality
            && !(1..=100).contains(&q)
        {
            return Err(ImagingError::BadOptions(format!("quality must be between 1 and 100, got {q}")));
        }
        Ok(())
    }
}

/// Limits checked from the image header before any pixel buffer is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_pixels: u64,
    pub max_side: u32,
    pub max_input_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_pixels: 50_000_000, max_side: 16_384, max_input_bytes: 50 * 1024 * 1024 }
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
        ] {
            assert!(matches!(bad.validate(), Err(ImagingError::BadOptions(_))), "{bad:?}");
        }
    }
}
