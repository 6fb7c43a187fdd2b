//! JPEG pixels from libjpeg-turbo, the decoder Pillow uses.
//!
//! Why not only the `image` crate's decoder (zune-jpeg): Hugging Face's CLIP
//! processor decodes with Pillow, that is with libjpeg-turbo's accurate
//! integer IDCT and smooth chroma upsampling. zune-jpeg's pixels differ from
//! those by up to a few levels, so our crops could not match the reference
//! exactly, and it is slower: on 640×480 photos (AMD EPYC Zen 2, one core)
//! 1.38–1.41 ms per image against zune-jpeg's 1.76–1.86 ms, which makes
//! decode-and-preprocess, what bounds `mmembed batch` on a GPU, 1.2× as
//! fast per core (BENCHMARKS.md). libjpeg-turbo (3.1, built from the
//! `turbojpeg-sys` crate's sources with its SIMD code) gives the same bytes
//! as Pillow's.
//!
//! Only the plain cases go this way: 8-bit lossy JPEGs in YCbCr, RGB or
//! grayscale that decode without a single warning. Everything else (CMYK
//! and YCCK, 12-bit, lossless, corrupt or truncated data, junk before a
//! marker) returns `None` and takes the `image` crate's path as before, so
//! what is accepted and what is refused does not change, only the pixels of
//! the plain case and their speed. That includes progressive JPEGs of more
//! than [`MAX_SCANS`] scans, which the `image` crate refuses: each scan is a
//! pass over the image's blocks, so a small file could otherwise ask for
//! thousands of passes.
//!
//! On request (`decode_image_draft`) this path also decodes at 1/2, 1/4 or
//! 1/8 of the size, as Pillow's `Image.draft` does: libjpeg reduces in the
//! inverse DCT, which skips most of the IDCT, colour conversion and
//! resizing work, and its pixels are Pillow's for the same request.

use std::cell::RefCell;

use image::RgbImage;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use crate::image::ImageLimits;

/// Scans a progressive JPEG may have on this path: the `image` crate's
/// decoder (zune-jpeg) refuses more than 100, and jpegtran's scan scripts
/// stop at 100 too; past it libjpeg-turbo stops and the file goes to the
/// other path, which refuses it.
const MAX_SCANS: u32 = 100;

thread_local! {
    // A decompressor per thread: rayon's workers decode many images each,
    // and a TurboJPEG instance is not for two threads at once.
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// The reduction Pillow's `draft` picks for an image of `(width, height)`
/// that must stay at least `(need_w, need_h)`: the largest of 8, 4 and 2
/// that both sides' whole ratios allow (`min(w // need_w, h // need_h)`),
/// else 1. The reduced sides round up, so they are never under the need.
pub(crate) fn draft_denominator((width, height): (u32, u32), (need_w, need_h): (u32, u32)) -> u32 {
    let ratio = (width / need_w.max(1)).min(height / need_h.max(1));
    [8, 4, 2].into_iter().find(|&d| ratio >= d).unwrap_or(1)
}

/// Decodes `bytes` to RGB with libjpeg-turbo when the JPEG is a plain one
/// (see the module's documentation) and fits `limits`; `None` otherwise.
/// `denominator` (1, 2, 4 or 8) reduces the image that many times in each
/// direction, each side rounded up.
///
/// `(width, height)` are the dimensions the caller already read from the
/// header and checked against the pixel limit; a header that disagrees
/// sends the image down the other path.
pub(crate) fn decode_plain(
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &ImageLimits,
    denominator: u32,
) -> Option<RgbImage> {
    // Taken out for the call and put back only after a clean decode: after
    // an error libjpeg's state is not worth trusting for the next image.
    let mut d = match DECOMPRESSOR.with(|cell| cell.borrow_mut().take()) {
        Some(d) => d,
        None => {
            let mut d = Decompressor::new().ok()?;
            d.set_scan_limit(MAX_SCANS).ok()?;
            d
        }
    };
    let rgb = decode_with(&mut d, bytes, (width, height), limits, denominator)?;
    DECOMPRESSOR.with(|cell| *cell.borrow_mut() = Some(d));
    Some(rgb)
}

fn decode_with(
    d: &mut Decompressor,
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &ImageLimits,
    denominator: u32,
) -> Option<RgbImage> {
    // Any warning is an error here (the crate reports TurboJPEG's -1 for
    // both); such files go to the lenient decoder as before.
    let header = d.read_header(bytes).ok()?;
    if !matches!(
        header.colorspace,
        Colorspace::YCbCr | Colorspace::RGB | Colorspace::Gray
    ) || header.is_lossless
        || (header.width, header.height) != (width as usize, height as usize)
    {
        return None;
    }
    // Set on every call: the decompressor is the thread's, and the call
    // before may have asked for another reduction.
    let scale = ScalingFactor::new(1, denominator as usize);
    d.set_scaling_factor(scale).ok()?;
    let (w, h) = (scale.scale(header.width), scale.scale(header.height));
    let out = w.checked_mul(h)?.checked_mul(3)?;
    // What libjpeg allocates beyond our output: a progressive image keeps
    // every DCT coefficient (2 bytes a sample, up to 3 samples a pixel, at
    // full size whatever the reduction) until the last scan. The `image`
    // crate's path enforces `max_alloc` itself; images that would pass it
    // only there go there.
    let full = header.width.checked_mul(header.height)?.checked_mul(3)?;
    let coefficients = if header.is_progressive { full * 2 } else { 0 };
    if (out + coefficients) as u64 > limits.max_alloc {
        return None;
    }
    let mut pixels = vec![0u8; out];
    let image = Image {
        pixels: pixels.as_mut_slice(),
        width: w,
        pitch: w * 3,
        height: h,
        format: PixelFormat::RGB,
    };
    d.decompress(bytes, image).ok()?;
    RgbImage::from_raw(w as u32, h as u32, pixels)
}
