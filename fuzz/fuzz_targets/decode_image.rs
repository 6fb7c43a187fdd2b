//! Any bytes through image decoding and CLIP preprocessing: errors are fine,
//! panics, hangs and huge allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_media::{ClipPreprocessor, ImageLimits, decode_image};

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        max_bytes: 1 << 20,
        max_alloc: 256 << 20,
    };
    if let Ok(img) = decode_image(data, "fuzz", &limits) {
        let _ = ClipPreprocessor::openai(224).preprocess(&img);
    }
});
