//! Any bytes through video probing and frame sampling from memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_media::video::{VideoBytes, probe, sample_frames};

fuzz_target!(|data: &[u8]| {
    let src = VideoBytes::Bytes(bytes::Bytes::copy_from_slice(data));
    if let Ok(info) = probe(&src) {
        // Bound the work per input: a few targets inside the claimed length.
        let d = info.duration_sec.min(60.0);
        let times = [0.0, d * 0.25, d * 0.5, d * 0.99];
        let _ = sample_frames(&src, &times, |_, _| {});
    }
});
