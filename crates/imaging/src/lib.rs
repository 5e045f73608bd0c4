//! The pixmesh image pipeline. It does no I/O: bytes in, bytes out.
//!
//! `sniff` → header checked against [`Limits`] before any pixel buffer exists → decode (with
//! shrink-on-load for JPEG and WebP) → EXIF auto-orientation → rotate → flip → crop → resize
//! ([`Fit`], [`Gravity`]) → grayscale → blur → sharpen → encode ([`OutputFormat`]). Metadata is
//! not copied to the output.

mod color;
mod error;
mod jpeg;
mod options;
mod pipeline;
mod sniff;
mod structure;
mod webp_scaled;

pub use error::ImagingError;
pub use options::Limits;
pub use pipeline::{Output, check_output, decode_jpeg_scaled, probe, process};
pub use pixmesh_model::options::{BadOptions, Crop, Fit, Flip, Gravity, MAX_OUTPUT_SIDE, Options, OutputFormat};
pub use sniff::{Format, sniff};
