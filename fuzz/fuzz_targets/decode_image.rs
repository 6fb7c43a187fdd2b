//! Any bytes through image decoding and CLIP preprocessing, whole and
//! reduced (`decode_image_draft`, as `--jpeg-draft` decodes): errors are
//! fine, panics, hangs and huge allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_media::{ClipPreprocessor, ImageLimits};

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        max_bytes: 1 << 20,
        max_alloc: 256 << 20,
    };
    let pre = ClipPreprocessor::openai(224);
    // The input's last byte picks the path, so the corpus reaches both.
    let draft = data.last().is_some_and(|b| b & 1 == 1);
    if let Ok(img) = pre.decode(data, "fuzz", &limits, draft) {
        let _ = pre.preprocess(&img);
    }
});
