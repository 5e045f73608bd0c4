//! Reads an image's format and size from its first bytes, as they arrive, without decoding it.
//!
//! [`Sniffer`] is fed the body in chunks of any size and holds at most [`PREFIX`] bytes: every
//! format but JPEG gives its size within them, and a JPEG's marker segments (EXIF, ICC profiles,
//! XMP, previews: megabytes before the frame header in some camera files) are walked by their
//! lengths as they stream past, holding only the walker's position. The imaging library has
//! header readers too, but it wants the whole file and pulls in the decoders; this is the few
//! hundred lines a proxy needs to decide on a stream that may be cut anywhere.

/// Image formats the gateway can size from their header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
    Gif,
    Bmp,
}

impl Format {
    pub fn from_name(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Some(Format::Jpeg),
            "png" => Some(Format::Png),
            "webp" => Some(Format::WebP),
            "gif" => Some(Format::Gif),
            "bmp" => Some(Format::Bmp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::WebP => "WebP",
            Format::Gif => "GIF",
            Format::Bmp => "BMP",
        }
    }
}

/// What a prefix of the body tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet.
    NeedMore,
    /// The format and the size in pixels.
    Image { format: Format, width: u32, height: u32 },
    /// A known format that is not accepted here (TIFF, AVIF, HEIC, PDF, …).
    Other(&'static str),
    /// No image format starts like this.
    Unknown,
    /// It starts like `format` but its header is broken.
    Corrupt(Format, &'static str),
}

/// Sniffs the start of an image file.
pub fn sniff(b: &[u8]) -> Sniff {
    if b.len() < 12 {
        // Decide this early only when even a short prefix cannot be an image.
        let could_be = b.len() < 4 || MAGICS.iter().any(|m| m.starts_with(b) || b.starts_with(m));
        return match could_be {
            false => Sniff::Unknown,
            true if b.starts_with(&[0xFF, 0xD8, 0xFF]) => jpeg(b),
            true => Sniff::NeedMore,
        };
    }
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        jpeg(b)
    } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(b)
    } else if b.starts_with(b"RIFF") && &b[8..12] == b"WEBP" {
        webp(b)
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        gif(b)
    } else if b.starts_with(b"BM") && bmp_plausible(b) {
        bmp(b)
    } else if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        Sniff::Other("TIFF")
    } else if &b[4..8] == b"ftyp" {
        match &b[8..12] {
            b"avif" | b"avis" => Sniff::Other("AVIF"),
            b"heic" | b"heix" | b"mif1" | b"msf1" => Sniff::Other("HEIF"),
            _ => Sniff::Unknown,
        }
    } else if b.starts_with(b"%PDF") {
        Sniff::Other("PDF")
    } else if b.starts_with(b"\0\0\x01\0") {
        Sniff::Other("ICO")
    } else if b.starts_with(b"<svg") || b.starts_with(b"<?xml") {
        Sniff::Other("SVG")
    } else {
        Sniff::Unknown
    }
}

/// Starts of the formats above, to tell "too short yet" from "not an image" on tiny prefixes.
const MAGICS: [&[u8]; 9] = [&[0xFF, 0xD8, 0xFF], b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF87a", b"GIF89a", b"BM", b"II*\0", b"MM\0*", b"%PDF"];

fn le16(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?])))
}
fn le24(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes([*b.get(at)?, *b.get(at + 1)?, *b.get(at + 2)?, 0]))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn sized(format: Format, width: u32, height: u32) -> Sniff {
    if width == 0 || height == 0 {
        Sniff::Corrupt(format, "the header gives a zero width or height")
    } else {
        Sniff::Image { format, width, height }
    }
}

/// A JPEG from its first bytes (all of them: the segments are walked, not searched).
fn jpeg(b: &[u8]) -> Sniff {
    let mut walk = JpegWalk::default();
    walk.feed(b.get(2..).unwrap_or_default())
}

/// Where the walk through a JPEG's marker segments is, after SOI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum JpegStep {
    /// A marker's 0xFF is next.
    #[default]
    Marker,
    /// The marker byte is next (more 0xFF are fill bytes).
    MarkerByte,
    /// The first byte of the segment's length is next.
    LengthHigh(u8),
    LengthLow(u8, u8),
    /// The segment's payload: this many bytes to skip.
    Skip(usize),
    /// The frame header: its precision, height and width bytes (5), this many read.
    Frame(usize),
    /// Stray bytes where a marker should be: skipped up to the next 0xFF, as libjpeg (and so
    /// libvips and Pillow) and pixmesh's decoder do, with a warning, not a refusal.
    Resync,
}

/// Walks the JPEG marker segments up to the frame header (SOFn), by their lengths, as the bytes
/// stream past: a handful of bytes of state, whatever the size of the metadata before the frame.
#[derive(Debug, Clone, Default)]
struct JpegWalk {
    step: JpegStep,
    frame: [u8; 5],
}

impl JpegWalk {
    fn feed(&mut self, mut b: &[u8]) -> Sniff {
        let corrupt = |why| Sniff::Corrupt(Format::Jpeg, why);
        while let Some((&byte, rest)) = b.split_first() {
            if let JpegStep::Skip(n) = self.step {
                let skipped = n.min(b.len());
                b = &b[skipped..];
                self.step = if skipped == n { JpegStep::Marker } else { JpegStep::Skip(n - skipped) };
                continue;
            }
            b = rest;
            self.step = match self.step {
                JpegStep::Marker | JpegStep::Resync if byte == 0xFF => JpegStep::MarkerByte,
                JpegStep::Marker | JpegStep::Resync => JpegStep::Resync,
                // Markers may be padded with any number of 0xFF fill bytes.
                JpegStep::MarkerByte => match byte {
                    0xFF => JpegStep::MarkerByte,
                    // 0xFF 0x00 is a stuffed byte, not a marker: keep looking.
                    0x00 => JpegStep::Resync,
                    0xD0..=0xD7 | 0x01 => JpegStep::Marker,
                    0xD8..=0xDA => return corrupt("the image data starts before its frame header"),
                    marker => JpegStep::LengthHigh(marker),
                },
                JpegStep::LengthHigh(marker) => JpegStep::LengthLow(marker, byte),
                JpegStep::LengthLow(marker, high) => {
                    let len = usize::from(u16::from_be_bytes([high, byte]));
                    let metadata = matches!(marker, 0xE0..=0xEF | 0xFE);
                    if len < 2 && metadata {
                        // A damaged APPn/COM length: its payload is unknowable, so look for the
                        // next marker (the decoder does the same).
                        self.step = JpegStep::Resync;
                        continue;
                    }
                    if len < 2 {
                        return corrupt("a header segment has an impossible length");
                    }
                    match marker {
                        0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => JpegStep::Frame(0),
                        _ if len == 2 => JpegStep::Marker,
                        _ => JpegStep::Skip(len - 2),
                    }
                }
                JpegStep::Frame(n) => {
                    self.frame[n] = byte;
                    if n + 1 < self.frame.len() {
                        JpegStep::Frame(n + 1)
                    } else {
                        let height = u32::from(u16::from_be_bytes([self.frame[1], self.frame[2]]));
                        let width = u32::from(u16::from_be_bytes([self.frame[3], self.frame[4]]));
                        if height == 0 {
                            return corrupt("the height is only given after the image data (DNL), which is not accepted");
                        }
                        return sized(Format::Jpeg, width, height);
                    }
                }
                JpegStep::Skip(_) => JpegStep::Marker,
            };
        }
        Sniff::NeedMore
    }
}

/// Bytes held to tell the format (and for all formats but JPEG, the size).
pub const PREFIX: usize = 64;

/// [`sniff`] on a stream: feed it the body's chunks as they come. Holds at most [`PREFIX`]
/// bytes; a JPEG's segments are walked by their lengths.
#[derive(Debug, Clone, Default)]
pub struct Sniffer {
    prefix: Vec<u8>,
    jpeg: Option<JpegWalk>,
    verdict: Option<Sniff>,
    seen: u64,
}

impl Sniffer {
    /// Feeds the next bytes; the answer is final once it is not `NeedMore`.
    pub fn feed(&mut self, bytes: &[u8]) -> Sniff {
        self.seen += bytes.len() as u64;
        if let Some(v) = &self.verdict {
            return v.clone();
        }
        let answer = match self.jpeg.as_mut() {
            Some(walk) => walk.feed(bytes),
            None => {
                let take = bytes.len().min(PREFIX - self.prefix.len());
                self.prefix.extend_from_slice(&bytes[..take]);
                if self.prefix.starts_with(&[0xFF, 0xD8, 0xFF]) {
                    let mut walk = JpegWalk::default();
                    let mut answer = walk.feed(&self.prefix[2..]);
                    if answer == Sniff::NeedMore {
                        answer = walk.feed(&bytes[take..]);
                    }
                    self.jpeg = Some(walk);
                    self.prefix = Vec::new();
                    answer
                } else {
                    match sniff(&self.prefix) {
                        // Every format but JPEG is sized within the prefix.
                        Sniff::NeedMore if self.prefix.len() >= PREFIX => Sniff::Unknown,
                        answer => answer,
                    }
                }
            }
        };
        if answer != Sniff::NeedMore {
            self.verdict = Some(answer.clone());
        }
        answer
    }

    /// The format, as soon as the first bytes tell it (before the size is known).
    pub fn format(&self) -> Option<Format> {
        match (&self.verdict, &self.jpeg) {
            (Some(Sniff::Image { format, .. } | Sniff::Corrupt(format, _)), _) => Some(*format),
            (_, Some(_)) => Some(Format::Jpeg),
            _ => None,
        }
    }

    /// How many bytes were fed.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

fn png(b: &[u8]) -> Sniff {
    if b.len() < 24 {
        return Sniff::NeedMore;
    }
    if &b[12..16] != b"IHDR" {
        return Sniff::Corrupt(Format::Png, "the first chunk is not IHDR");
    }
    match (be32(b, 16), be32(b, 20)) {
        (Some(w), Some(h)) if w <= i32::MAX as u32 && h <= i32::MAX as u32 => sized(Format::Png, w, h),
        (Some(_), Some(_)) => Sniff::Corrupt(Format::Png, "the size is out of range"),
        _ => Sniff::NeedMore,
    }
}

fn webp(b: &[u8]) -> Sniff {
    if b.len() < 30 {
        return Sniff::NeedMore;
    }
    match &b[12..16] {
        b"VP8 " => {
            if b[23..26] != [0x9D, 0x01, 0x2A] {
                return Sniff::Corrupt(Format::WebP, "the VP8 frame has no start code");
            }
            match (le16(b, 26), le16(b, 28)) {
                (Some(w), Some(h)) => sized(Format::WebP, w & 0x3FFF, h & 0x3FFF),
                _ => Sniff::NeedMore,
            }
        }
        b"VP8L" => {
            if b[20] != 0x2F {
                return Sniff::Corrupt(Format::WebP, "the VP8L stream has no signature");
            }
            match le32(b, 21) {
                Some(bits) => sized(Format::WebP, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1),
                None => Sniff::NeedMore,
            }
        }
        b"VP8X" => match (le24(b, 24), le24(b, 27)) {
            (Some(w), Some(h)) => sized(Format::WebP, w + 1, h + 1),
            _ => Sniff::NeedMore,
        },
        _ => Sniff::Corrupt(Format::WebP, "the first chunk is not VP8, VP8L or VP8X"),
    }
}

fn gif(b: &[u8]) -> Sniff {
    match (le16(b, 6), le16(b, 8)) {
        (Some(w), Some(h)) => sized(Format::Gif, w, h),
        _ => Sniff::NeedMore,
    }
}

/// "BM" alone is too weak (it starts plenty of text); the DIB header size must be a known one.
fn bmp_plausible(b: &[u8]) -> bool {
    le32(b, 14).is_none_or(|n| matches!(n, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124))
}

fn bmp(b: &[u8]) -> Sniff {
    let Some(dib) = le32(b, 14) else { return Sniff::NeedMore };
    if dib == 12 {
        return match (le16(b, 18), le16(b, 20)) {
            (Some(w), Some(h)) => sized(Format::Bmp, w, h),
            _ => Sniff::NeedMore,
        };
    }
    match (le32(b, 18), le32(b, 22)) {
        (Some(w), Some(h)) => {
            let (w, h) = (w as i32, h as i32);
            if w <= 0 || h == i32::MIN {
                return Sniff::Corrupt(Format::Bmp, "the size is out of range");
            }
            // A negative height means rows stored top-down.
            sized(Format::Bmp, w.unsigned_abs(), h.unsigned_abs())
        }
        _ => Sniff::NeedMore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg_with(app_bytes: usize, w: u16, h: u16) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        // An APP1 segment as big as EXIF gets, then a fill byte, then SOF2.
        let len = (app_bytes + 2) as u16;
        v.extend_from_slice(&[0xFF, 0xE1]);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(0u8, app_bytes));
        v.extend_from_slice(&[0xFF, 0xFF, 0xC2, 0, 17, 8]);
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        v.extend_from_slice(&[0xFF, 0xDA, 0, 8]);
        v
    }

    /// Every prefix says NeedMore until the size is in, then the answer never changes.
    fn settles(bytes: &[u8], expected: Sniff) {
        let mut decided = None;
        for n in 0..=bytes.len() {
            let s = sniff(&bytes[..n]);
            match (&decided, s) {
                (None, Sniff::NeedMore) => {}
                (None, s) => decided = Some(s),
                (Some(d), s) => assert_eq!(&s, d, "prefix {n} changed its mind"),
            }
        }
        assert_eq!(decided, Some(expected));
    }

    #[test]
    fn damaged_metadata_is_walked_past_as_decoders_do() {
        // An APP13 whose length reads 0, then stray bytes, then the frame header.
        let good = jpeg_with(10, 1200, 800);
        let mut v = vec![0xFF, 0xD8, 0xFF, 0xED, 0x00, 0x00, b'8', b'B', b'I', b'M', 0x00, 0x13];
        v.extend_from_slice(&good[2..]);
        assert_eq!(sniff(&v), Sniff::Image { format: Format::Jpeg, width: 1200, height: 800 });
        // Stray bytes (and a stuffed 0xFF 0x00) between two segments.
        let mut stray = good[..16].to_vec();
        stray.extend_from_slice(&[0x00, 0x11, 0xFF, 0x00, 0x22]);
        stray.extend_from_slice(&good[16..]);
        assert_eq!(sniff(&stray), Sniff::Image { format: Format::Jpeg, width: 1200, height: 800 });
        for size in [1, 3, 4096] {
            assert_eq!(streamed(&stray, size), Sniff::Image { format: Format::Jpeg, width: 1200, height: 800 });
        }
        // A table segment with an impossible length is still refused.
        let bad_table = [0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x01, 0xFF, 0xC0, 0, 17, 8, 0, 8, 0, 8];
        assert!(matches!(sniff(&bad_table), Sniff::Corrupt(Format::Jpeg, _)));
    }

    #[test]
    fn jpeg_size_after_metadata_segments() {
        let j = jpeg_with(3000, 6000, 4000);
        settles(&j, Sniff::Image { format: Format::Jpeg, width: 6000, height: 4000 });
        assert_eq!(sniff(&j[..3000]), Sniff::NeedMore);
        let mut bad = jpeg_with(10, 1, 1);
        bad[16] = 0x00; // a fill byte before the SOF replaced: skipped, as decoders do
        assert_eq!(sniff(&bad), Sniff::Image { format: Format::Jpeg, width: 1, height: 1 });
        let mut sos_first = vec![0xFF, 0xD8, 0xFF, 0xDA, 0, 8];
        sos_first.extend([0; 8]);
        assert!(matches!(sniff(&sos_first), Sniff::Corrupt(Format::Jpeg, _)));
    }

    /// Fed in chunks of `size`, the sniffer says what `sniff` says of the whole.
    fn streamed(bytes: &[u8], size: usize) -> Sniff {
        let mut sniffer = Sniffer::default();
        let mut answer = Sniff::NeedMore;
        for chunk in bytes.chunks(size.max(1)) {
            answer = sniffer.feed(chunk);
        }
        answer
    }

    #[test]
    fn the_sniffer_walks_megabytes_of_segments_as_they_stream_past() {
        // 112 full APPn segments (7.3 MB) before the frame header, as in some camera files.
        let mut j = vec![0xFF, 0xD8];
        for i in 0..112u8 {
            j.extend_from_slice(&[0xFF, 0xE3 + i % 10, 0xFF, 0xFF]);
            j.extend(std::iter::repeat_n(0xFFu8, 65_533));
        }
        let tail = jpeg_with(10, 3648, 2432);
        j.extend_from_slice(&tail[2..]);
        assert!(j.len() > 7_300_000);
        let expected = Sniff::Image { format: Format::Jpeg, width: 3648, height: 2432 };
        assert_eq!(sniff(&j), expected);
        for size in [2, 3, 7, 4096, 65_536, 1 << 20] {
            assert_eq!(streamed(&j, size), expected, "chunks of {size}");
        }
        let mut sniffer = Sniffer::default();
        assert_eq!(sniffer.feed(&j[..3]), Sniff::NeedMore);
        assert_eq!(sniffer.format(), Some(Format::Jpeg), "the format is known before the size");
        assert_eq!(sniffer.feed(&j[3..5_000_000]), Sniff::NeedMore);
        assert_eq!(sniffer.feed(&j[5_000_000..]), expected);
        assert!(sniffer.prefix.capacity() <= PREFIX, "nothing is held");
        // Damaged on the way: a segment's marker is missing after the 50th segment. Decoders
        // look for the next marker, and so does the walk; a broken table is still refused.
        let mut broken = j.clone();
        broken[2 + 50 * 65_537] = 0x00;
        assert_eq!(streamed(&broken, 4096), expected);
    }

    #[test]
    fn streamed_in_any_chunks_the_answer_is_the_same() {
        let mut samples = vec![jpeg_with(300, 6000, 4000), jpeg_with(0, 1, 1), b"II*\0\x08\0\0\0\0\0\0\0\0".to_vec(), b"hello".to_vec()];
        let mut png = Vec::new();
        image::RgbImage::new(30, 7).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        samples.push(png);
        let mut bmp = Vec::new();
        image::RgbImage::new(17, 5).write_to(&mut std::io::Cursor::new(&mut bmp), image::ImageFormat::Bmp).unwrap();
        samples.push(bmp);
        for bytes in &samples {
            for size in 1..40 {
                assert_eq!(streamed(bytes, size), sniff(bytes), "chunks of {size}");
            }
        }
    }

    #[test]
    fn real_encoders_headers() {
        let mut png = Vec::new();
        image::RgbImage::new(3000, 7).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        settles(&png, Sniff::Image { format: Format::Png, width: 3000, height: 7 });
        let mut gif = Vec::new();
        image::RgbaImage::new(9, 700).write_to(&mut std::io::Cursor::new(&mut gif), image::ImageFormat::Gif).unwrap();
        settles(&gif, Sniff::Image { format: Format::Gif, width: 9, height: 700 });
        let mut webp = Vec::new();
        image::RgbaImage::new(321, 123).write_to(&mut std::io::Cursor::new(&mut webp), image::ImageFormat::WebP).unwrap();
        settles(&webp, Sniff::Image { format: Format::WebP, width: 321, height: 123 });
        let mut bmp = Vec::new();
        image::RgbImage::new(17, 5).write_to(&mut std::io::Cursor::new(&mut bmp), image::ImageFormat::Bmp).unwrap();
        settles(&bmp, Sniff::Image { format: Format::Bmp, width: 17, height: 5 });
        let mut jpeg = Vec::new();
        image::RgbImage::new(640, 480).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        settles(&jpeg, Sniff::Image { format: Format::Jpeg, width: 640, height: 480 });
    }

    #[test]
    fn lossy_webp_and_extended_webp() {
        // VP8 (lossy) key frame header: 3-byte frame tag, start code, 14-bit sizes.
        let mut vp8 = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0".to_vec();
        vp8.extend_from_slice(&[0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A]);
        vp8.extend_from_slice(&(3840u16 | 0x4000).to_le_bytes()); // upper bits are scaling, not size
        vp8.extend_from_slice(&2160u16.to_le_bytes());
        settles(&vp8, Sniff::Image { format: Format::WebP, width: 3840, height: 2160 });
        let mut vp8x = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x10\0\0\0".to_vec();
        vp8x.extend_from_slice(&[0x3F, 0x1F, 0x00, 0x6F, 0x17, 0x00]); // 7999+1 × 5999+1
        settles(&vp8x, Sniff::Image { format: Format::WebP, width: 8000, height: 6000 });
    }

    #[test]
    fn other_and_unknown() {
        assert_eq!(sniff(b"II*\0\x08\0\0\0\0\0\0\0\0"), Sniff::Other("TIFF"));
        assert_eq!(sniff(b"\0\0\0\x1cftypavif\0\0\0\0"), Sniff::Other("AVIF"));
        assert_eq!(sniff(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3"), Sniff::Other("PDF"));
        assert_eq!(sniff(b"{\"json\": true}"), Sniff::Unknown);
        assert_eq!(sniff(b"hello"), Sniff::Unknown);
        assert_eq!(sniff(b"BMhello world, this is text"), Sniff::Unknown);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(b"\x89PN"), Sniff::NeedMore);
        assert_eq!(sniff(b"GIF8"), Sniff::NeedMore);
        assert!(matches!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\0\0\0\0\x01"), Sniff::Corrupt(Format::Png, _)));
    }
}
