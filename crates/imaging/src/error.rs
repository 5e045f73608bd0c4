use crate::sniff::Format;

/// Why an image could not be processed. None of these is worth retrying on another worker:
/// the same bytes fail the same way everywhere.
///
/// The `Display` text is what a client is told: a plain sentence. What a decoder or encoder
/// said (`reason`: a third-party crate's words, often its `Debug` output) is kept apart, for
/// the log ([`ImagingError::detail`]), never in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImagingError {
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    /// A format pixmesh reads, using a feature its decoder does not (the decoder's words in `reason`).
    #[error("this {} image uses a feature pixmesh cannot decode", format.name())]
    UnsupportedFeature { format: Format, reason: String },
    #[error("image is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels and {max_side} pixels per side")]
    TooLarge { width: u32, height: u32, pixels: u64, max_pixels: u64, max_side: u32 },
    #[error("input is {bytes} bytes; the limit is {max_bytes} bytes")]
    InputTooLarge { bytes: usize, max_bytes: usize },
    #[error("the {} data is corrupt or truncated", format.name())]
    Corrupt { format: Format, reason: String },
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    #[error("invalid options: {0}")]
    BadOptions(String),
    #[error("the image could not be encoded as {format}")]
    Encode { format: &'static str, reason: String },
    #[error(
        "the requested output is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels and {max_side} pixels per side; ask for a smaller width or height"
    )]
    OutputTooLarge { width: u32, height: u32, pixels: u64, max_pixels: u64, max_side: u32 },
}

impl From<pixmesh_model::options::BadOptions> for ImagingError {
    fn from(e: pixmesh_model::options::BadOptions) -> Self {
        ImagingError::BadOptions(e.0)
    }
}

impl ImagingError {
    /// The wire name of this error in pixmesh's error table (`corrupt_image`, …).
    pub fn code(&self) -> &'static str {
        match self {
            ImagingError::UnsupportedFormat(_) | ImagingError::UnsupportedFeature { .. } => "unsupported_format",
            ImagingError::TooLarge { .. } => "image_too_large",
            ImagingError::InputTooLarge { .. } => "payload_too_large",
            ImagingError::Corrupt { .. } => "corrupt_image",
            ImagingError::LimitExceeded(_) => "limit_exceeded",
            ImagingError::BadOptions(_) => "bad_request",
            ImagingError::Encode { .. } => "internal",
            ImagingError::OutputTooLarge { .. } => "image_too_large",
        }
    }

    /// What the decoder or encoder said, for the log only.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ImagingError::Corrupt { reason, .. }
            | ImagingError::UnsupportedFeature { reason, .. }
            | ImagingError::Encode { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_words_stay_out_of_the_message() {
        let internals =
            r#"Format error decoding Png: ChunkType { type: IDAT, critical: true, private: false, reserved: false, safecopy: false }"#;
        for (err, message) in [
            (ImagingError::Corrupt { format: Format::Png, reason: internals.into() }, "the PNG data is corrupt or truncated"),
            (ImagingError::Corrupt { format: Format::Jpeg, reason: internals.into() }, "the JPEG data is corrupt or truncated"),
            (ImagingError::Corrupt { format: Format::Webp, reason: internals.into() }, "the WebP data is corrupt or truncated"),
            (
                ImagingError::UnsupportedFeature { format: Format::Tiff, reason: internals.into() },
                "this TIFF image uses a feature pixmesh cannot decode",
            ),
            (ImagingError::Encode { format: "png", reason: internals.into() }, "the image could not be encoded as png"),
        ] {
            assert_eq!(err.to_string(), message);
            assert_eq!(err.detail(), Some(internals), "the detail is kept for the log");
        }
    }
}
