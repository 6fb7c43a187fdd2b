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
//! Only the plain cases go this way: 8-bit lossy JPEGs in YCbCr, RGB,
//! grayscale, CMYK or YCCK (made RGB as Pillow makes it) that decode
//! without a single warning. Everything else (12-bit, lossless, corrupt or
//! truncated data, junk before a marker) returns `None` and takes the
//! `image` crate's path as before, so
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
//!
//! And on request (`columns`) only the columns a crop reads are inverse
//! transformed, colour converted and stored, by libjpeg-turbo's partial
//! decompression (`tj3SetCroppingRegion`); the entropy decoding still reads
//! every block and row, so what is refused does not change either.
//!
//! Why over `turbojpeg-sys` and not the `turbojpeg` crate (used before): its
//! `Decompressor` has no cropping region and checks the output against the
//! whole image, and it needs the output initialised (a memset of every
//! image's pixels that libjpeg then overwrites, 2-3 % of decoding).

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::ptr::NonNull;

use image::RgbImage;
use turbojpeg_sys as tj;

use crate::image::{Decoded, ImageLimits};

/// Scans a progressive JPEG may have on this path: the `image` crate's
/// decoder (zune-jpeg) refuses more than 100, and jpegtran's scan scripts
/// stop at 100 too; past it libjpeg-turbo stops and the file goes to the
/// other path, which refuses it.
const MAX_SCANS: c_int = 100;

/// Columns kept on each side of those a crop reads when decoding part of
/// the width: libjpeg's smooth chroma upsampling takes the cropped
/// region's edge for the image's, so its outermost column is not the whole
/// image's (checked in the tests: none of these differ, and without the
/// margin the crops do).
const CROP_MARGIN: u32 = 4;

/// iMCU width in pixels per `TJSAMP_*` subsampling (444, 422, 420, gray,
/// 440, 411, 441): `tjMCUWidth` of `turbojpeg.h`, a `static` there, so
/// not a symbol the library exports.
const MCU_WIDTH: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];

thread_local! {
    // A decompressor per thread: rayon's workers decode many images each,
    // and a TurboJPEG instance is not for two threads at once.
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// An owned TurboJPEG decompression instance.
struct Decompressor(NonNull<c_void>);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0.as_ptr()) }
    }
}

/// What the header says, as this path needs it.
struct Header {
    width: u32,
    height: u32,
    subsamp: c_int,
    colorspace: tj::TJCS,
    lossless: bool,
    progressive: bool,
}

impl Decompressor {
    fn new() -> Option<Self> {
        // SAFETY: plain constructor; null on failure.
        let d = Self(NonNull::new(unsafe {
            tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int)
        })?);
        d.set(tj::TJPARAM_TJPARAM_SCANLIMIT, MAX_SCANS)?;
        Some(d)
    }

    fn set(&self, param: tj::TJPARAM, value: c_int) -> Option<()> {
        // SAFETY: a live handle; an unknown parameter is an error return.
        (unsafe { tj::tj3Set(self.0.as_ptr(), param as c_int, value) } == 0).then_some(())
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: as above (-1 for an unknown parameter).
        unsafe { tj::tj3Get(self.0.as_ptr(), param as c_int) }
    }

    fn header(&self, bytes: &[u8]) -> Option<Header> {
        // SAFETY: the buffer is valid for its length; TurboJPEG only reads.
        let rc =
            unsafe { tj::tj3DecompressHeader(self.0.as_ptr(), bytes.as_ptr(), bytes.len() as _) };
        if rc != 0 {
            return None;
        }
        Some(Header {
            width: u32::try_from(self.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).ok()?,
            height: u32::try_from(self.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).ok()?,
            subsamp: self.get(tj::TJPARAM_TJPARAM_SUBSAMP),
            colorspace: tj::TJCS::try_from(self.get(tj::TJPARAM_TJPARAM_COLORSPACE)).ok()?,
            lossless: self.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0,
            progressive: self.get(tj::TJPARAM_TJPARAM_PROGRESSIVE) != 0,
        })
    }
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
/// direction, each side rounded up. `columns`, given the reduced image's
/// `(width, height)`, says which columns are wanted: only those (and a
/// margin, and back to the alignment libjpeg needs) are decoded.
///
/// `(width, height)` are the dimensions the caller already read from the
/// header and checked against the pixel limit; a header that disagrees
/// sends the image down the other path.
pub(crate) fn decode_plain(
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &ImageLimits,
    denominator: u32,
    columns: Option<&dyn Fn(u32, u32) -> Range<u32>>,
) -> Option<Decoded> {
    // Taken out for the call and put back only after a clean decode: after
    // an error libjpeg's state is not worth trusting for the next image.
    let d = match DECOMPRESSOR.with(|cell| cell.borrow_mut().take()) {
        Some(d) => d,
        None => Decompressor::new()?,
    };
    let plain = decode_with(&d, bytes, (width, height), limits, denominator, columns)?;
    DECOMPRESSOR.with(|cell| *cell.borrow_mut() = Some(d));
    Some(plain)
}

fn decode_with(
    d: &Decompressor,
    bytes: &[u8],
    (width, height): (u32, u32),
    limits: &ImageLimits,
    denominator: u32,
    columns: Option<&dyn Fn(u32, u32) -> Range<u32>>,
) -> Option<Decoded> {
    // Any warning is an error here (TurboJPEG returns -1 for both); such
    // files go to the lenient decoder as before.
    let header = d.header(bytes)?;
    let cmyk = [tj::TJCS_TJCS_CMYK, tj::TJCS_TJCS_YCCK].contains(&header.colorspace);
    if !(cmyk
        || [tj::TJCS_TJCS_YCbCr, tj::TJCS_TJCS_RGB, tj::TJCS_TJCS_GRAY]
            .contains(&header.colorspace))
        || header.lossless
        || (header.width, header.height) != (width, height)
    {
        return None;
    }
    // CMYK (YCCK converted by libjpeg) comes out as its four bytes a pixel,
    // turned into RGB below as Pillow does.
    let (format, depth) = if cmyk {
        (tj::TJPF_TJPF_CMYK, 4)
    } else {
        (tj::TJPF_TJPF_RGB, 3)
    };
    // Set on every call: the decompressor is the thread's, and the call
    // before may have asked for another reduction or region.
    let scaled = |n: u32| n.div_ceil(denominator);
    let factor = tj::tjscalingfactor {
        num: 1,
        denom: c_int::try_from(denominator).ok()?,
    };
    // SAFETY: a live handle; TurboJPEG checks the factor.
    if unsafe { tj::tj3SetScalingFactor(d.0.as_ptr(), factor) } != 0 {
        return None;
    }
    let (w, h) = (scaled(header.width), scaled(header.height));
    let (x0, x1) = match columns.map(|f| f(w, h)) {
        Some(want) if want.start < want.end && want.end <= w => {
            // The region's left edge must fall on an iMCU column (of the
            // reduced image); an unknown subsampling decodes whole.
            let mcu = usize::try_from(header.subsamp)
                .ok()
                .and_then(|s| MCU_WIDTH.get(s).copied())
                .map_or(0, &scaled);
            let x0 = want.start.saturating_sub(CROP_MARGIN);
            match mcu {
                0 => (0, w),
                m => {
                    // A progressive image whose scans leave coefficients
                    // unrefined is smoothed from the DC values of two
                    // blocks on each side, and the region's first blocks
                    // take themselves for their left neighbours: two iMCU
                    // columns more (a chroma block of 4:2:0 is one wide).
                    let smoothing = if header.progressive { 2 * m } else { 0 };
                    (
                        (x0 - x0 % m).saturating_sub(smoothing),
                        (want.end + CROP_MARGIN).min(w),
                    )
                }
            }
        }
        _ => (0, w),
    };
    // The whole image is all zeros (`TJUNCROPPED`); so is a width of 0.
    let region = tj::tjregion {
        x: c_int::try_from(x0).ok()?,
        y: 0,
        w: if (x0, x1) == (0, w) {
            0
        } else {
            c_int::try_from(x1 - x0).ok()?
        },
        h: 0,
    };
    // SAFETY: a live handle whose header was read; TurboJPEG checks the
    // region against the (reduced) image.
    if unsafe { tj::tj3SetCroppingRegion(d.0.as_ptr(), region) } != 0 {
        return None;
    }
    let cols = (x1 - x0) as usize;
    let out = cols.checked_mul(h as usize)?.checked_mul(depth)?;
    // What libjpeg allocates beyond our output: a progressive image keeps
    // every DCT coefficient (2 bytes a sample, up to 3 samples a pixel, at
    // full size whatever the reduction or region) until the last scan. The
    // `image` crate's path enforces `max_alloc` itself; images that would
    // pass it only there go there. Counted for the whole (reduced) output
    // even when decoding part of it, so that what a limit refuses does
    // not depend on the crop.
    let whole = (w as usize).checked_mul(h as usize)?.checked_mul(depth)?;
    let full = (header.width as usize)
        .checked_mul(header.height as usize)?
        .checked_mul(depth)?;
    let coefficients = if header.progressive { full * 2 } else { 0 };
    if (whole + coefficients) as u64 > limits.max_alloc {
        return None;
    }
    let mut pixels = Vec::<u8>::with_capacity(out);
    // SAFETY: the destination holds `out` bytes, `cols * depth` a row for
    // `h` rows, which is what TurboJPEG writes for this region, reduction
    // and pixel format; the bytes count as initialised only after it
    // returns success.
    let rc = unsafe {
        tj::tj3Decompress8(
            d.0.as_ptr(),
            bytes.as_ptr(),
            bytes.len() as _,
            pixels.as_mut_ptr(),
            c_int::try_from(cols * depth).ok()?,
            format,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: a successful decompression wrote every one of the `out` bytes.
    unsafe { pixels.set_len(out) };
    if cmyk {
        pixels = cmyk_to_rgb(&pixels);
    }
    Some(Decoded {
        image: RgbImage::from_raw(x1 - x0, h, pixels)?,
        x0,
        width: w,
        alpha: None,
    })
}

/// CMYK bytes as libjpeg stores them to RGB, as Pillow reads a CMYK JPEG:
/// inverted first (its "CMYK;I" raw mode: Adobe's convention, which it
/// assumes for every CMYK JPEG), then its `cmyk2rgb`, `k' − c'·k'/255`
/// per channel with `k' = 255 − k` and the product rounded as its
/// `MULDIV255` rounds it.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        // Inverted: the stored k is 255 − k, which is Pillow's nk.
        let nk = u32::from(p[3]);
        for &stored in &p[..3] {
            let c = 255 - u32::from(stored);
            rgb.push(nk.saturating_sub(muldiv255(c, nk)) as u8);
        }
    }
    rgb
}

/// JPEGs made by libjpeg-turbo's own compressor, for tests that need
/// sizes, subsamplings and scan structures the committed fixtures lack.
#[cfg(test)]
pub(crate) mod make {
    use super::*;

    /// `img` compressed at `quality` with TurboJPEG's subsampling `subsamp`
    /// (`TJSAMP_*`: 444, 422, 420, gray, 440, 411, 441), progressive or not.
    pub(crate) fn encode(
        img: &RgbImage,
        subsamp: c_int,
        quality: c_int,
        progressive: bool,
    ) -> Vec<u8> {
        compress(
            img.as_raw(),
            img.dimensions(),
            (tj::TJPF_TJPF_RGB, 3),
            &[
                (tj::TJPARAM_TJPARAM_SUBSAMP, subsamp),
                (tj::TJPARAM_TJPARAM_QUALITY, quality),
                (tj::TJPARAM_TJPARAM_PROGRESSIVE, c_int::from(progressive)),
            ],
        )
    }

    /// CMYK bytes (four a pixel) compressed as YCCK, as libjpeg writes a
    /// CMYK source by default (with Adobe's marker), 4:4:4.
    pub(crate) fn encode_ycck(cmyk: &[u8], size: (u32, u32), quality: c_int) -> Vec<u8> {
        compress(
            cmyk,
            size,
            (tj::TJPF_TJPF_CMYK, 4),
            &[
                (tj::TJPARAM_TJPARAM_SUBSAMP, tj::TJSAMP_TJSAMP_444 as c_int),
                (tj::TJPARAM_TJPARAM_QUALITY, quality),
                (tj::TJPARAM_TJPARAM_COLORSPACE, tj::TJCS_TJCS_YCCK as c_int),
            ],
        )
    }

    /// `pixels` (`(format, bytes a pixel)`, rows of `w` pixels) compressed
    /// with these TurboJPEG parameters.
    fn compress(
        pixels: &[u8],
        (w, h): (u32, u32),
        (format, depth): (tj::TJPF, c_int),
        params: &[(tj::TJPARAM, c_int)],
    ) -> Vec<u8> {
        assert_eq!(pixels.len(), (w * h) as usize * depth as usize);
        // SAFETY: test helper; the source is `h` rows of `w * depth` bytes
        // (checked above), TurboJPEG allocates the output, copied and freed
        // here.
        unsafe {
            let handle = tj::tj3Init(tj::TJINIT_TJINIT_COMPRESS as c_int);
            assert!(!handle.is_null());
            for &(p, v) in params {
                assert_eq!(tj::tj3Set(handle, p as c_int, v), 0);
            }
            let mut buf: *mut u8 = std::ptr::null_mut();
            let mut size = 0;
            let (w, h) = (w as c_int, h as c_int);
            let rc = tj::tj3Compress8(
                handle,
                pixels.as_ptr(),
                w,
                w * depth,
                h,
                format,
                &mut buf,
                &mut size,
            );
            assert_eq!(rc, 0, "tj3Compress8");
            let out = std::slice::from_raw_parts(buf, size as usize).to_vec();
            tj::tj3Free(buf.cast());
            tj::tj3Destroy(handle);
            out
        }
    }

    /// A progressive JPEG without its refinement scans (`Ah` ≠ 0): a valid
    /// file whose coefficients stay coarse, which libjpeg smooths across
    /// blocks when decoding.
    pub(crate) fn drop_refinement_scans(jpeg: &[u8]) -> Vec<u8> {
        let mut out = jpeg[..2].to_vec();
        let mut i = 2;
        while i + 2 <= jpeg.len() {
            assert_eq!(jpeg[i], 0xFF, "a marker at {i}");
            let marker = jpeg[i + 1];
            if marker == 0xD9 {
                out.extend_from_slice(&jpeg[i..i + 2]);
                break;
            }
            let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
            let mut end = i + 2 + len;
            if marker == 0xDA {
                // Entropy-coded data runs to the next marker other than a
                // stuffed zero or a restart.
                while jpeg[end] != 0xFF || matches!(jpeg[end + 1], 0x00 | 0xD0..=0xD7) {
                    end += 1;
                }
                let ns = usize::from(jpeg[i + 4]);
                let ah = jpeg[i + 5 + 2 * ns + 2] >> 4;
                if ah != 0 {
                    i = end;
                    continue;
                }
            }
            out.extend_from_slice(&jpeg[i..end]);
            i = end;
        }
        out
    }
}
