//! The limits under which untrusted bytes are read (the options themselves live in
//! `pixmesh-model`: they cross role boundaries).

use serde::{Deserialize, Serialize};

/// Limits checked from the image header before any pixel buffer is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_pixels: u64,
    pub max_side: u32,
    pub max_input_bytes: usize,
    /// Most scans a (progressive) JPEG may have.
    pub max_scans: usize,
    /// Most frames an animated GIF or WebP may have (pixmesh renders the first).
    pub max_frames: usize,
    /// The largest output the options may ask for: pixels, and the longest side (by default
    /// the same as the input limits), so a tiny upload cannot demand a huge result.
    pub max_output_pixels: u64,
    pub max_output_side: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 50_000_000,
            max_side: 16_384,
            max_input_bytes: 50 * 1024 * 1024,
            max_scans: 256,
            max_frames: 1000,
            max_output_pixels: 50_000_000,
            max_output_side: 16_384,
        }
    }
}

impl Limits {
    /// Refuses an output of `width` × `height` above the output limits.
    pub fn check_output(&self, width: u32, height: u32) -> Result<(), crate::ImagingError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_output_pixels || width.max(height) > self.max_output_side {
            return Err(crate::ImagingError::OutputTooLarge {
                width,
                height,
                pixels,
                max_pixels: self.max_output_pixels,
                max_side: self.max_output_side,
            });
        }
        Ok(())
    }
}
