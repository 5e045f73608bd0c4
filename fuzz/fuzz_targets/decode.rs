//! Header sniffing + decode under limits + the rest of the pipeline, on arbitrary bytes.
//! Any panic, abort, or allocation past libFuzzer's `-rss_limit_mb` is a bug.
//! Each crash found is saved under `crates/imaging/tests/fuzz-regressions/` and replayed by
//! `cargo test -p pixmesh-imaging`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pixmesh_imaging::{Fit, Limits, Options, OutputFormat};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_pixels: 4_000_000, max_side: 4096, max_input_bytes: 1 << 20, max_scans: 64, max_frames: 100, ..Limits::default() };
    let _ = pixmesh_imaging::sniff(data);
    let _ = pixmesh_imaging::probe(data, &limits);
    // Full-size decoding, then a tiny output (JPEG at 1/8 scale, WebP scaled by libwebp).
    let options = Options { width: Some(48), height: Some(32), fit: Fit::Cover, format: OutputFormat::Png, ..Options::default() };
    let _ = pixmesh_imaging::process(data, &options, &limits);
    let tiny = Options { width: Some(6), format: OutputFormat::Jpeg, ..Options::default() };
    let _ = pixmesh_imaging::process(data, &tiny, &limits);
});
