//! Format detection from magic bytes. The declared `Content-Type` is never trusted.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Gif,
    Bmp,
    Tiff,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
            Format::Gif => "gif",
            Format::Bmp => "bmp",
            Format::Tiff => "tiff",
        }
    }

    /// The name people write: `JPEG`, `PNG`, `WebP`, … (for messages).
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Webp => "WebP",
            Format::Gif => "GIF",
            Format::Bmp => "BMP",
            Format::Tiff => "TIFF",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Gif => "image/gif",
            Format::Bmp => "image/bmp",
            Format::Tiff => "image/tiff",
        }
    }

    pub(crate) fn to_image_format(self) -> image::ImageFormat {
        match self {
            Format::Jpeg => image::ImageFormat::Jpeg,
            Format::Png => image::ImageFormat::Png,
            Format::Webp => image::ImageFormat::WebP,
            Format::Gif => image::ImageFormat::Gif,
            Format::Bmp => image::ImageFormat::Bmp,
            Format::Tiff => image::ImageFormat::Tiff,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The format of `bytes` from its first bytes, or `None` if pixmesh does not read it.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    match bytes {
        [0xFF, 0xD8, 0xFF, ..] => Some(Format::Jpeg),
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(Format::Png),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(Format::Webp),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(Format::Gif),
        [b'B', b'M', ..] => Some(Format::Bmp),
        [b'I', b'I', 0x2A, 0x00, ..] | [b'M', b'M', 0x00, 0x2A, ..] => Some(Format::Tiff),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes() {
        let check = |bytes: &[u8], expected: Option<Format>| assert_eq!(sniff(bytes), expected, "{bytes:?}");
        check(&[0xFF, 0xD8, 0xFF, 0xE0], Some(Format::Jpeg));
        check(b"\x89PNG\r\n\x1a\n....", Some(Format::Png));
        check(b"RIFF\0\0\0\0WEBPVP8 ", Some(Format::Webp));
        check(b"RIFF\0\0\0\0WAVEfmt ", None);
        check(b"GIF89a", Some(Format::Gif));
        check(b"GIF87a", Some(Format::Gif));
        check(b"BM....", Some(Format::Bmp));
        check(b"II*\0", Some(Format::Tiff));
        check(b"MM\0*", Some(Format::Tiff));
        check(b"<svg xmlns=", None);
        check(b"", None);
        check(&[0xFF, 0xD8], None);
    }
}
