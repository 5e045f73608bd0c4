//! Counting what a file contains by walking its container structure, without decoding:
//! JPEG scans (a progressive JPEG with thousands of scans makes decoding quadratic) and
//! animation frames (GIF image descriptors, WebP `ANMF` chunks). Linear in the input size.

/// Number of scans (SOS markers) in a JPEG.
pub(crate) fn jpeg_scans(bytes: &[u8]) -> usize {
    let mut scans = 0;
    let mut i = 2; // after SOI
    while i + 3 < bytes.len() {
        if bytes[i] != 0xFF {
            i += 1;
            continue;
        }
        let marker = bytes[i + 1];
        match marker {
            // Fill bytes, stuffed zeros and restart markers inside entropy-coded data.
            0xFF => i += 1,
            0x00 | 0xD0..=0xD7 | 0x01 => i += 2,
            0xD9 => break, // EOI
            _ => {
                if marker == 0xDA {
                    scans += 1;
                }
                // Every other marker has a 2-byte length; entropy-coded data after SOS is then
                // skipped byte by byte above.
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                i += 2 + len.max(2);
            }
        }
    }
    scans
}

/// Number of frames in a GIF (image descriptors), walking its blocks.
pub(crate) fn gif_frames(bytes: &[u8]) -> usize {
    let Some(&packed) = bytes.get(10) else { return 0 };
    let mut i = 13;
    if packed & 0x80 != 0 {
        i += 3 * (1 << ((packed & 0x07) + 1));
    }
    let skip_sub_blocks = |mut i: usize| {
        while let Some(&n) = bytes.get(i) {
            i += 1 + usize::from(n);
            if n == 0 {
                break;
            }
        }
        i
    };
    let mut frames = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            0x2C => {
                frames += 1;
                let Some(&flags) = bytes.get(i + 9) else { break };
                i += 10;
                if flags & 0x80 != 0 {
                    i += 3 * (1 << ((flags & 0x07) + 1));
                }
                i = skip_sub_blocks(i + 1); // LZW minimum code size, then data
            }
            0x21 => i = skip_sub_blocks(i + 2),
            _ => break, // 0x3B trailer, or garbage
        }
    }
    frames
}

/// Number of frames in a WebP: its `ANMF` chunks, or 1 for a still image.
pub(crate) fn webp_frames(bytes: &[u8]) -> usize {
    let mut i = 12;
    let mut frames = 0;
    while i + 8 <= bytes.len() {
        let size = u32::from_le_bytes([bytes[i + 4], bytes[i + 5], bytes[i + 6], bytes[i + 7]]) as usize;
        if &bytes[i..i + 4] == b"ANMF" {
            frames += 1;
        }
        i = i.saturating_add(8).saturating_add(size + (size & 1));
    }
    frames.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_scans_and_frames() {
        // SOI, SOS (len 2) + entropy data containing a stuffed FF00 and RST0, SOS, EOI.
        let jpeg = [0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 1, 2, 0xFF, 0x00, 3, 0xFF, 0xD0, 4, 0xFF, 0xDA, 0, 2, 5, 0xFF, 0xD9];
        assert_eq!(jpeg_scans(&jpeg), 2);
        // GIF without colour table, two 1x1 frames, trailer.
        let mut gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00".to_vec();
        for _ in 0..2 {
            gif.extend_from_slice(&[0x21, 0xF9, 4, 0, 0, 0, 0, 0]);
            gif.extend_from_slice(&[0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 0x01, 0]);
        }
        gif.push(0x3B);
        assert_eq!(gif_frames(&gif), 2);
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0".to_vec();
        webp.extend_from_slice(&[0; 10]);
        for _ in 0..3 {
            webp.extend_from_slice(b"ANMF\x02\0\0\0xx");
        }
        assert_eq!(webp_frames(&webp), 3);
        assert_eq!(webp_frames(b"RIFF\0\0\0\0WEBPVP8 \x04\0\0\0abcd"), 1);
        // Truncated or garbage input never panics.
        for n in 0..gif.len() {
            gif_frames(&gif[..n]);
        }
        for n in 0..jpeg.len() {
            jpeg_scans(&jpeg[..n]);
        }
    }
}
