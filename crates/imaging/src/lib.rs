//! The pixmesh image pipeline. It does no I/O: bytes in, bytes out.
//!
//! `sniff` → header checked against [`Limits`] before any pixel buffer exists → decode →
//! EXIF auto-orientation → resize ([`Fit`]) → encode ([`OutputFormat`]). Metadata is not copied
//! to the output.

mod error;
mod options;
mod pipeline;
mod sniff;
mod webp_scaled;

pub use error::ImagingError;
pub use options::{Fit, Limits, Options, OutputFormat};
pub use pipeline::{Output, probe, process};
pub use sniff::{Format, sniff};
