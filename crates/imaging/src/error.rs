use crate::sniff::Format;

/// Why an image could not be processed. None of these is worth retrying on another worker:
/// the same bytes fail the same way everywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImagingError {
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error("image is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels and {max_side} pixels per side")]
    TooLarge { width: u32, height: u32, pixels: u64, max_pixels: u64, max_side: u32 },
    #[error("input is {bytes} bytes; the limit is {max_bytes} bytes")]
    InputTooLarge { bytes: usize, max_bytes: usize },
    #[error("corrupt {format} image: {reason}")]
    Corrupt { format: Format, reason: String },
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    #[error("invalid options: {0}")]
    BadOptions(String),
    #[error("cannot encode {format}: {reason}")]
    Encode { format: &'static str, reason: String },
    #[error(
        "the requested output is {width}x{height} ({pixels} pixels); the limit is {max_pixels} pixels and {max_side} pixels per side; ask for a smaller width or height"
    )]
    OutputTooLarge { width: u32, height: u32, pixels: u64, max_pixels: u64, max_side: u32 },
}

impl ImagingError {
    /// The wire name of this error in pixmesh's error table (`corrupt_image`, …).
    pub fn code(&self) -> &'static str {
        match self {
            ImagingError::UnsupportedFormat(_) => "unsupported_format",
            ImagingError::TooLarge { .. } => "image_too_large",
            ImagingError::InputTooLarge { .. } => "payload_too_large",
            ImagingError::Corrupt { .. } => "corrupt_image",
            ImagingError::LimitExceeded(_) => "limit_exceeded",
            ImagingError::BadOptions(_) => "bad_request",
            ImagingError::Encode { .. } => "internal",
            ImagingError::OutputTooLarge { .. } => "image_too_large",
        }
    }
}
