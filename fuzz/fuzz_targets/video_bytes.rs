//! Any bytes through video probing and frame sampling from memory, in both
//! sampling modes, with swscale resizing to a model size, on one decoder or
//! on parallel keyframe runs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_media::ClipPreprocessor;
use mmembed_media::video::{SampleMode, SampleOptions, VideoBytes, probe, sample_frames_with};

fuzz_target!(|data: &[u8]| {
    let src = VideoBytes::Bytes(bytes::Bytes::copy_from_slice(data));
    if let Ok(info) = probe(&src) {
        // Bound the work per input: a few targets inside the claimed length.
        let d = info.duration_sec.min(60.0);
        let times = [0.0, d * 0.25, d * 0.5, d * 0.99];
        // The last byte picks the options, so the fuzzer explores all of them.
        let pick = data.last().copied().unwrap_or(0);
        let opts = SampleOptions {
            mode: if pick & 1 == 1 { SampleMode::Keyframes } else { SampleMode::Exact },
            resize_for: (pick & 2 == 2).then(|| ClipPreprocessor::openai(32)),
            skip_loop_filter: pick & 4 == 4,
            // Two threads reach the parallel keyframe runs on indexed files.
            threads: if pick & 8 == 8 { 2 } else { 1 },
        };
        let _ = sample_frames_with(&src, &times, &opts, |_, _| {});
    }
});
