//! Any bytes through image decoding and CLIP preprocessing, whole and
//! reduced (`decode_image_draft`, as `--jpeg-draft` and `--heic-thumbnail`
//! decode), and through
//! `decode_crop_into` (what `mmembed batch` runs: a JPEG decoded only over
//! the columns the crop reads): errors are fine, panics, hangs and huge
//! allocations are bugs, and so is a crop that differs from the whole
//! decode's when both succeed (they promise the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_media::{ClipPreprocessor, Draft, ImageLimits};

fuzz_target!(|data: &[u8]| {
    let limits = ImageLimits {
        max_pixels: 4_000_000,
        max_bytes: 1 << 20,
        max_alloc: 256 << 20,
    };
    // The input's last byte picks the path and the crop size, so the
    // corpus reaches each (odd sizes stress the columns the crop reads).
    let pick = data.last().copied().unwrap_or(0);
    let draft = if pick & 1 == 1 {
        Draft {
            jpeg: true,
            heic_thumbnail: true,
        }
    } else {
        Draft::NONE
    };
    let size = [224, 37, 8, 336][usize::from(pick >> 1 & 3)];
    let pre = ClipPreprocessor::openai(size);
    let whole = pre.decode(data, "fuzz", &limits, draft);
    if let Ok(img) = &whole {
        let _ = pre.preprocess(img);
    }
    let (w, h) = pre.output_size();
    let mut row = vec![0u8; w as usize * h as usize * 3];
    let cropped = pre.decode_crop_into(data, "fuzz", &limits, draft, &mut row);
    // libde265 leaves the blocks of a corrupt HEVC stream it cannot decode
    // as the buffer held them (found by this target: two decodes of one
    // mutated HEIC differ), so the HEIC path promises no such equality.
    let heic = data.get(4..8) == Some(b"ftyp");
    if let (Ok(img), Ok(()), false) = (&whole, &cropped, heic) {
        let mut expected = vec![0u8; row.len()];
        pre.crop_into(img, &mut expected).unwrap();
        assert!(row == expected, "the crop differs from the whole decode's");
    }
});
