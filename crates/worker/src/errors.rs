use pixmesh_chassis::ErrorCode;
use pixmesh_imaging::ImagingError;

/// The error-table code for an imaging failure.
pub fn error_code(err: &ImagingError) -> ErrorCode {
    ErrorCode::parse(err.code()).unwrap_or(ErrorCode::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_imaging::Format;

    #[test]
    fn every_imaging_error_has_a_row_and_bad_images_are_permanent() {
        let check = |err: ImagingError, code: ErrorCode| {
            assert_eq!(ErrorCode::parse(err.code()), Some(code), "{err}");
            assert_eq!(error_code(&err), code);
        };
        check(ImagingError::UnsupportedFormat("x".into()), ErrorCode::UnsupportedFormat);
        check(ImagingError::UnsupportedFeature { format: Format::Tiff, reason: "x".into() }, ErrorCode::UnsupportedFormat);
        check(ImagingError::Corrupt { format: Format::Png, reason: "x".into() }, ErrorCode::CorruptImage);
        check(ImagingError::TooLarge { width: 1, height: 1, pixels: 1, max_pixels: 0, max_side: 0 }, ErrorCode::ImageTooLarge);
        check(ImagingError::InputTooLarge { bytes: 2, max_bytes: 1 }, ErrorCode::PayloadTooLarge);
        check(ImagingError::LimitExceeded("x".into()), ErrorCode::LimitExceeded);
        check(ImagingError::BadOptions("x".into()), ErrorCode::BadRequest);
        check(ImagingError::Encode { format: "png", reason: "x".into() }, ErrorCode::Internal);
        for code in [
            ErrorCode::UnsupportedFormat,
            ErrorCode::CorruptImage,
            ErrorCode::ImageTooLarge,
            ErrorCode::LimitExceeded,
            ErrorCode::BadRequest,
        ] {
            assert!(!code.is_retryable(), "{code}");
        }
    }
}
