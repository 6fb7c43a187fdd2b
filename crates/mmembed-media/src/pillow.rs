//! Pillow's 8-bit resampling (`libImaging/Resample.c`), reimplemented.
//!
//! Why not a resize crate: CLIP checkpoints were trained, and Hugging Face's
//! reference processor runs, on Pillow's exact arithmetic. Generic resizers
//! (the `image` crate, `fast_image_resize`) use the same filters but a
//! different pass order or intermediate precision; measured on the fixture
//! photos, `fast_image_resize` (vertical pass first) differed from Pillow by
//! up to 11 levels on edge pixels (mean 0.15). Pillow's algorithm is:
//!
//! - per output pixel, filter taps from `xmin = (int)(center - support + 0.5)`
//!   with the support widened by the downscale factor;
//! - weights normalised in f64, then quantised to 22-bit fixed point with
//!   round-half-away-from-zero;
//! - the horizontal pass first, rounded and clipped to u8, then the vertical
//!   pass on those bytes; except (recent Pillow, checked in Pillow 13's
//!   `Resample.c`) when the height shrinks by more than twice what the
//!   width does: then the vertical pass runs first, over every column.
//!
//! A source box (Pillow's `box=` argument) selects a window of the source
//! while the taps stay clipped to the whole image; resizing the box of a
//! centre crop therefore gives exactly the pixels of resize-then-crop.

use image::RgbImage;

use crate::Resample;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn filter(resample: Resample) -> (fn(f64) -> f64, f64) {
    fn boxf(x: f64) -> f64 {
        if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 }
    }
    fn bilinear(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 { 1.0 - x } else { 0.0 }
    }
    fn hamming(x: f64) -> f64 {
        let x = x.abs();
        if x == 0.0 {
            1.0
        } else if x >= 1.0 {
            0.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x * (0.54 + 0.46 * x.cos())
        }
    }
    fn bicubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    fn lanczos(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }
    match resample {
        Resample::Box => (boxf, 0.5),
        Resample::Bilinear => (bilinear, 1.0),
        Resample::Hamming => (hamming, 1.0),
        Resample::Bicubic => (bicubic, 2.0),
        Resample::Lanczos => (lanczos, 3.0),
        // Nearest does not use taps; see `nearest_index`.
        Resample::Nearest => (boxf, 0.5),
    }
}

/// Fixed-point taps of one output pixel along one axis.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
fn taps(in_size: u32, in0: f64, in1: f64, out_size: u32, resample: Resample) -> Vec<Taps> {
    let (f, base_support) = filter(resample);
    let scale = (in1 - in0) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = base_support * filterscale;
    let ss = 1.0 / filterscale;
    let one = f64::from(1u32 << PRECISION_BITS);
    (0..out_size)
        .map(|xx| {
            let center = in0 + (f64::from(xx) + 0.5) * scale;
            // C's (int) truncates toward zero; the value is clamped to >= 0.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let n = (xmax - xmin).max(0) as usize;
            let mut k: Vec<f64> = (0..n)
                .map(|x| f((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let weights = k
                .into_iter()
                .map(|w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Pillow's nearest-neighbour (`ImagingScaleAffine`): the source pixel
/// under each output centre, the centres found by repeated addition of the
/// step (not multiplication: the accumulated rounding moves some exact
/// halves, e.g. 24 -> 18 pixels, to the neighbour, and Pillow's output has
/// them there), truncated toward zero. A centre outside the source leaves
/// the pixel black, as Pillow's fill does.
fn nearest_index(in_size: u32, in0: f64, in1: f64, out_size: u32) -> Vec<Option<u32>> {
    let step = (in1 - in0) / f64::from(out_size);
    let mut centre = in0 + step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = (centre >= 0.0 && centre < f64::from(in_size)).then_some(centre as u32);
            centre += step;
            i
        })
        .collect()
}

/// An image, or the columns `x0..x0 + image.width()` (all rows) of one
/// `width` wide: what a partial JPEG decode gives.
#[derive(Clone, Copy)]
pub(crate) struct Columns<'a> {
    pub image: &'a RgbImage,
    pub x0: u32,
    pub width: u32,
}

impl<'a> From<&'a RgbImage> for Columns<'a> {
    fn from(image: &'a RgbImage) -> Self {
        Self {
            image,
            x0: 0,
            width: image.width(),
        }
    }
}

/// Pillow's test for a horizontal pass (`need_horizontal` in
/// `Resample.c`; it compares the box's right edge with the output width).
fn needs_horizontal(sw: u32, w: u32, bx: [f64; 4]) -> bool {
    w != sw || bx[0] != 0.0 || bx[2] != f64::from(w)
}

/// The source columns [`resize`] reads of an image `sw` wide for the same
/// arguments: what a partial decode must hold.
pub(crate) fn columns_read(
    sw: u32,
    w: u32,
    resample: Resample,
    bx: [f64; 4],
) -> std::ops::Range<u32> {
    if resample == Resample::Nearest {
        let xs = nearest_index(sw, bx[0], bx[2], w);
        let lo = xs.iter().flatten().copied().min();
        let hi = xs.iter().flatten().copied().max();
        return match (lo, hi) {
            (Some(lo), Some(hi)) => lo..hi + 1,
            _ => 0..0,
        };
    }
    if !needs_horizontal(sw, w, bx) {
        return 0..sw;
    }
    let t = taps(sw, bx[0], bx[2], w, resample);
    let lo = t.iter().map(|t| t.start).min().unwrap_or(0);
    let hi = t
        .iter()
        .map(|t| t.start + t.weights.len())
        .max()
        .unwrap_or(lo);
    lo as u32..hi as u32
}

/// Resizes the source box `[left, top, right, bottom]` of `img`
/// to `w × h` exactly as Pillow's `Image.resize((w, h), resample, box)` does
/// for an RGB image. `w`, `h` and the image must be non-empty. `whole` is
/// the size of the resize this is a window of (`(w, h)` for a plain
/// resize): Pillow picks its pass order from that call's sizes, and the
/// order changes the rounding.
///
/// `img` may hold only some of the image's columns (the taps stay those
/// of the whole image); an error says it lacks one that is read (never
/// when they are [`columns_read`]'s).
pub(crate) fn resize(
    img: Columns<'_>,
    w: u32,
    h: u32,
    resample: Resample,
    bx: [f64; 4],
    whole: (u32, u32),
) -> Result<RgbImage, String> {
    let (sw, sh) = (img.width, img.image.height());
    let (x0, iw) = (img.x0 as usize, img.image.width() as usize);
    let missing = |lo: usize, hi: usize| {
        format!(
            "columns {lo}..{hi} are read, the decoded ones are {x0}..{}",
            x0 + iw
        )
    };
    let src = img.image.as_raw();
    if resample == Resample::Nearest {
        let xs = nearest_index(sw, bx[0], bx[2], w);
        let ys = nearest_index(sh, bx[1], bx[3], h);
        let mut out = RgbImage::new(w, h);
        for (y, sy) in ys.iter().enumerate() {
            for (x, sx) in xs.iter().enumerate() {
                if let (Some(sx), Some(sy)) = (sx, sy) {
                    let Some(col) = (*sx as usize).checked_sub(x0).filter(|&c| c < iw) else {
                        return Err(missing(*sx as usize, *sx as usize + 1));
                    };
                    out.put_pixel(x as u32, y as u32, *img.image.get_pixel(col as u32, *sy));
                }
            }
        }
        return Ok(out);
    }
    let need_h = needs_horizontal(sw, w, bx);
    let need_v = h != sh || bx[1] != 0.0 || bx[3] != f64::from(h);
    // Pillow runs the vertical pass first when the height shrinks by more
    // than twice what the width does (fewer rows for the horizontal pass);
    // a different order rounds differently in between (up to 10 levels on
    // a 180 x 400 photo squashed to 224 x 224).
    let (dh, dw) = (
        i64::from(sh) - i64::from(whole.1),
        i64::from(sw) - i64::from(whole.0),
    );
    let vertical_first = dh > 0 && dh > 2 * dw;
    let vtaps = need_v.then(|| taps(sh, bx[1], bx[3], h, resample));
    if !need_h && (x0, iw) != (0, sw as usize) {
        return Err(missing(0, sw as usize));
    }
    // The taps of the whole image (Pillow clips them to it), moved to the
    // decoded columns.
    let mut htaps = if need_h {
        taps(sw, bx[0], bx[2], w, resample)
    } else {
        Vec::new()
    };
    for t in &mut htaps {
        let end = t.start + t.weights.len();
        if t.start < x0 || end > x0 + iw {
            return Err(missing(t.start, end));
        }
        t.start -= x0;
    }
    let (out_w, out) = if vertical_first {
        let mid = match &vtaps {
            Some(vt) => vertical(src, iw, 0, vt),
            None => src.to_vec(),
        };
        if need_h {
            (w as usize, horizontal(&mid, iw, 0..h as usize, &htaps))
        } else {
            (iw, mid)
        }
    } else {
        // Horizontal pass, only over the rows the vertical pass will read.
        let (row0, row1) = match &vtaps {
            Some(t) => {
                let first = t.first().map_or(0, |t| t.start);
                let last = t.last().map_or(0, |t| t.start + t.weights.len());
                (first, last.max(first))
            }
            None => (0, sh as usize),
        };
        let (mid_w, mid) = if need_h {
            (w as usize, horizontal(src, iw, row0..row1, &htaps))
        } else {
            (iw, src[row0 * iw * 3..row1 * iw * 3].to_vec())
        };
        match &vtaps {
            None => (mid_w, mid),
            Some(vt) => (mid_w, vertical(&mid, mid_w, row0, vt)),
        }
    };
    Ok(RgbImage::from_raw(out_w as u32, h, out).unwrap_or_else(|| unreachable!("buffer is w*h*3")))
}

/// Pillow's accumulator start: half of the last fixed-point unit, so the
/// final shift rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows of the source one horizontal block transposes and filters at once.
/// 16 RGB rows are 48 lanes per tap (three AVX-512 or six AVX2 registers),
/// and 16 is the side of the byte transposes ([`transpose16`]); the
/// transposed columns are taken [`OUT_CHUNK`] outputs at a time.
const BLOCK: usize = 16;

/// Outputs of the horizontal pass filtered per transposed block of
/// columns: the columns they read (about 140 when CLIP shrinks a 640-pixel
/// row, 6.7 KB transposed) stay in L1 while they are written and read,
/// where a whole row's (30 KB) left the stores missing it.
const OUT_CHUNK: usize = 64;

/// Bytes per column of a transposed block: [`BLOCK`] rows of RGB.
const LANES: usize = BLOCK * 3;

/// Where channel `ch` of column `x` starts in a transposed block laid out
/// `[x][channel][row]`: its [`BLOCK`] rows' bytes follow one another.
#[inline(always)]
fn lane(x: usize, ch: usize) -> usize {
    x * LANES + ch * BLOCK
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Runs `$body` (an `#[inline(always)]` function's call) compiled for the
/// widest vectors the CPU has: the passes are plain loops over contiguous
/// lanes that the compiler vectorises, and the baseline x86-64 target
/// (SSE2) has no 32-bit lane multiply.
macro_rules! widest {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has the features the copy was built for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

widest!(horizontal(src: &[u8], width: usize, rows: std::ops::Range<usize>, htaps: &[Taps]) -> Vec<u8> = horizontal_lanes);
widest!(vertical(src: &[u8], width: usize, row0: usize, vtaps: &[Taps]) -> Vec<u8> = vertical_lanes);

/// Pillow's horizontal 8-bit pass over `rows` of an RGB buffer `width`
/// pixels wide: one output row per input row, rounded and clipped to u8.
///
/// Pillow loops over each output pixel's taps, a dot product too short to
/// vectorise. The taps are the same on every row, so this transposes
/// [`BLOCK`] rows at a time (`[x][channel][row]`, by 16 × 16 byte
/// transposes) and filters them together: each tap is then a multiply-add
/// over 48 contiguous lanes. The outputs are transposed back the same way.
/// Same products, same 32-bit sums as Pillow's, so the same bytes.
#[inline(always)]
fn horizontal_lanes(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    htaps: &[Taps],
) -> Vec<u8> {
    let w = htaps.len();
    let taps = Padded::new(htaps, width);
    let k = taps.count;
    let mut mid = vec![0u8; rows.len() * w * 3];
    let mut block = Vec::new();
    let mut outs = [0u8; OUT_CHUNK * LANES];
    let (first, end) = (rows.start, rows.end);
    for y0 in rows.step_by(BLOCK) {
        let n = BLOCK.min(end - y0);
        // Rows past `n` in the last block repeat its last row: filtered,
        // never written out.
        let lines: [&[u8]; BLOCK] =
            std::array::from_fn(|r| &src[(y0 + r.min(n - 1)) * width * 3..][..width * 3]);
        let out_rows = &mut mid[(y0 - first) * w * 3..][..n * w * 3];
        for (c, (starts, weights)) in taps
            .starts
            .chunks(OUT_CHUNK)
            .zip(taps.weights.chunks(OUT_CHUNK * k))
            .enumerate()
        {
            // The source columns this chunk of outputs reads, transposed.
            let lo = starts.iter().copied().min().unwrap_or(0);
            let hi = starts.iter().map(|s| s + k).max().unwrap_or(lo);
            block.resize((hi - lo) * LANES, 0);
            rows_to_lanes(&lines, lo, hi, &mut block);
            for ((&start, ws), out) in starts
                .iter()
                .zip(weights.chunks_exact(k))
                .zip(outs.chunks_exact_mut(LANES))
            {
                let cols = &block[(start - lo) * LANES..][..k * LANES];
                // 16 lanes at a time, so that the sums stay in registers
                // (one AVX-512 or two AVX2 registers) across the taps.
                for (part, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let mut acc = [HALF; BLOCK];
                    for (col, &wt) in cols.chunks_exact(LANES).zip(ws) {
                        let px = &col[part * BLOCK..][..BLOCK];
                        for (a, &p) in acc.iter_mut().zip(px) {
                            // Pillow's int arithmetic; never wraps (|sum| <
                            // 2^31 for normalised weights), wrapping keeps
                            // it panic-free.
                            *a = a.wrapping_add(i32::from(p).wrapping_mul(wt));
                        }
                    }
                    for (o, a) in out.iter_mut().zip(acc) {
                        *o = clip8(a);
                    }
                }
            }
            lanes_to_rows(&outs[..starts.len() * LANES], out_rows, n, w, c * OUT_CHUNK);
        }
    }
    mid
}

/// Every output's taps padded with zero weights to the longest's count.
///
/// Why: the tap count varies from one output to the next (8 or 9 when CLIP
/// shrinks a 640-pixel row), so the loop over taps ended where the branch
/// predictor could not guess, once per output and channel: `perf` put the
/// horizontal pass at a fifth of decode + preprocess, most of it there. A
/// zero weight adds nothing to Pillow's sum, so the bytes are the same.
struct Padded {
    /// Taps per output.
    count: usize,
    /// First source column of each output's taps.
    starts: Vec<usize>,
    /// `count` weights per output.
    weights: Vec<i32>,
}

impl Padded {
    /// Pads `taps` over a row `width` pixels wide. The zeros go after an
    /// output's weights, or before them where the row ends first (the
    /// start moves left): every tap's column is in the row, as no output
    /// has more taps than the row has pixels.
    fn new(taps: &[Taps], width: usize) -> Self {
        // At least one (a zero) so that every output has a column to read.
        let count = taps
            .iter()
            .map(|t| t.weights.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut starts = Vec::with_capacity(taps.len());
        let mut weights = Vec::with_capacity(taps.len() * count);
        for t in taps {
            let (start, before) = if t.weights.is_empty() {
                (0, 0)
            } else {
                let start = t.start.min(width.saturating_sub(count));
                (start, t.start - start)
            };
            starts.push(start);
            weights.extend(std::iter::repeat_n(0, before));
            weights.extend(&t.weights);
            weights.extend(std::iter::repeat_n(0, count - before - t.weights.len()));
        }
        Self {
            count,
            starts,
            weights,
        }
    }
}

/// Transposes a 16 × 16 byte matrix (`m[r][c]` becomes `m[c][r]`).
#[inline(always)]
fn transpose16(m: &mut [[u8; 16]; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SSE2, which every x86-64 CPU has: four rounds of unpacking, each
        // doubling the run of one column's bytes (1, 2, 4, 8, then 16 rows).
        // SAFETY: the loads and stores are of 16-byte arrays in bounds.
        unsafe {
            let x: [__m128i; 16] = std::array::from_fn(|r| _mm_loadu_si128(m[r].as_ptr().cast()));
            // a[8h + p]: rows 2p, 2p + 1 interleaved, columns 8h..8h + 8.
            let a: [__m128i; 16] = std::array::from_fn(|i| {
                let (h, p) = (i / 8, i % 8);
                if h == 0 {
                    _mm_unpacklo_epi8(x[2 * p], x[2 * p + 1])
                } else {
                    _mm_unpackhi_epi8(x[2 * p], x[2 * p + 1])
                }
            });
            // b[4g + q]: rows 4q..4q + 4, columns 4g..4g + 4.
            let b: [__m128i; 16] = std::array::from_fn(|i| {
                let (g, q) = (i / 4, i % 4);
                let (u, v) = (a[8 * (g / 2) + 2 * q], a[8 * (g / 2) + 2 * q + 1]);
                if g % 2 == 0 {
                    _mm_unpacklo_epi16(u, v)
                } else {
                    _mm_unpackhi_epi16(u, v)
                }
            });
            // d[4g + 2e + h]: rows 8h..8h + 8, columns 4g + 2e, 4g + 2e + 1.
            let d: [__m128i; 16] = std::array::from_fn(|i| {
                let (g, e, h) = (i / 4, (i / 2) % 2, i % 2);
                let (u, v) = (b[4 * g + 2 * h], b[4 * g + 2 * h + 1]);
                if e == 0 {
                    _mm_unpacklo_epi32(u, v)
                } else {
                    _mm_unpackhi_epi32(u, v)
                }
            });
            for (c, row) in m.iter_mut().enumerate() {
                let (pair, odd) = (c / 2, c % 2);
                let (u, v) = (d[2 * pair], d[2 * pair + 1]);
                let col = if odd == 0 {
                    _mm_unpacklo_epi64(u, v)
                } else {
                    _mm_unpackhi_epi64(u, v)
                };
                _mm_storeu_si128(row.as_mut_ptr().cast(), col);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let t = *m;
        for (r, row) in m.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = t[c][r];
            }
        }
    }
}

/// Columns `lo..hi` of 16 RGB rows into `block` as `[x][channel][row]`
/// (48 bytes per column). Per 16 columns: each row's 48 bytes are three
/// 16-byte pieces; transposing the 16 rows' `k`th pieces gives, for each
/// byte `16k + j` of a row (column `(16k + j) / 3`, channel `(16k + j) % 3`),
/// that byte of all 16 rows. Byte-at-a-time copies (three per pixel, to
/// slots 48 bytes apart) took half of this pass.
#[inline(always)]
fn rows_to_lanes(lines: &[&[u8]; BLOCK], lo: usize, hi: usize, block: &mut [u8]) {
    let mut x0 = lo;
    while x0 + 16 <= hi {
        for k in 0..3 {
            // Loops rather than `array::from_fn`, which was not inlined.
            let mut m = [[0u8; 16]; 16];
            for (row, line) in m.iter_mut().zip(lines) {
                row.copy_from_slice(&line[x0 * 3 + 16 * k..][..16]);
            }
            transpose16(&mut m);
            for (j, bytes) in m.iter().enumerate() {
                let b = 16 * k + j;
                block[lane(x0 - lo + b / 3, b % 3)..][..16].copy_from_slice(bytes);
            }
        }
        x0 += 16;
    }
    for x in x0..hi {
        for (r, line) in lines.iter().enumerate() {
            for ch in 0..3 {
                block[lane(x - lo, ch) + r] = line[x * 3 + ch];
            }
        }
    }
}

/// The inverse of [`rows_to_lanes`] for outputs: `outs` holds consecutive
/// output pixels as `[channel][row]` (48 bytes each), written to columns
/// from `xx0` of the first `n` (at most 16) rows of `rows`, `w` pixels
/// wide.
#[inline(always)]
fn lanes_to_rows(outs: &[u8], rows: &mut [u8], n: usize, w: usize, xx0: usize) {
    let count = outs.len() / LANES;
    let mut g = 0;
    while g + 16 <= count {
        for k in 0..3 {
            let mut m = [[0u8; 16]; 16];
            for (j, row) in m.iter_mut().enumerate() {
                let b = 16 * k + j;
                row.copy_from_slice(&outs[lane(g + b / 3, b % 3)..][..16]);
            }
            transpose16(&mut m);
            for (r, bytes) in m.iter().enumerate().take(n) {
                rows[r * w * 3 + (xx0 + g) * 3 + 16 * k..][..16].copy_from_slice(bytes);
            }
        }
        g += 16;
    }
    for x in g..count {
        for r in 0..n {
            for ch in 0..3 {
                rows[r * w * 3 + (xx0 + x) * 3 + ch] = outs[lane(x, ch) + r];
            }
        }
    }
}

/// Pillow's vertical 8-bit pass: one output row per tap set, reading the
/// RGB buffer `width` pixels wide whose first row is source row `row0`.
/// Row at a time (a multiply-add of each tap's whole row into 32-bit
/// sums) where Pillow goes pixel at a time: the same sums.
#[inline(always)]
fn vertical_lanes(src: &[u8], width: usize, row0: usize, vtaps: &[Taps]) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; vtaps.len() * stride];
    let mut acc = vec![0i32; stride];
    for (yy, t) in vtaps.iter().enumerate() {
        acc.fill(HALF);
        for (i, &k) in t.weights.iter().enumerate() {
            let srow = &src[(t.start - row0 + i) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(srow) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(k));
            }
        }
        for (d, &a) in out[yy * stride..][..stride].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_taps_match_pillow_shape() {
        // Downscale by 2: support 4, taps sum to 1.0 in fixed point (± rounding).
        let t = taps(100, 0.0, 100.0, 50, Resample::Bicubic);
        assert_eq!(t.len(), 50);
        for tap in &t {
            let s: i32 = tap.weights.iter().sum();
            assert!(
                (s - (1 << PRECISION_BITS)).abs() <= tap.weights.len() as i32,
                "{s}"
            );
        }
        // First output: center 1.0, xmin = (int)(1 - 4 + 0.5) clamped to 0.
        assert_eq!(t[0].start, 0);
    }

    /// Every filter, boxes, up- and downscaling, both pass orders, against
    /// Pillow's own output (models/fixtures/make_resample.py).
    #[test]
    fn matches_pillow_on_noise() {
        let fx = crate::fixture::Fixture::open("resample", "cases.bin");
        let (cases, blob) = (&fx.cases, &fx.blob);
        assert!(cases.len() > 70);
        let dims =
            |v: &serde_json::Value| (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32);
        let mut bad = Vec::new();
        for (n, case) in cases.iter().enumerate() {
            let resample = Resample::from_pil(case["resample"].as_u64().unwrap() as u32).unwrap();
            let ((sw, sh), (w, h)) = (dims(&case["src"]), dims(&case["dst"]));
            let at = |key: &str, len: u32| {
                let o = case[key].as_u64().unwrap() as usize;
                blob[o..o + len as usize * 3].to_vec()
            };
            let img = RgbImage::from_raw(sw, sh, at("src_offset", sw * sh)).unwrap();
            let want = at("dst_offset", w * h);
            let bx = match case["box"].as_array() {
                Some(b) => [0, 1, 2, 3].map(|i| b[i].as_f64().unwrap()),
                None => [0.0, 0.0, f64::from(sw), f64::from(sh)],
            };
            let got = resize((&img).into(), w, h, resample, bx, (w, h)).unwrap();
            let wrong = got
                .as_raw()
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .count();
            if wrong > 0 {
                bad.push(format!(
                    "case {n} {case}: {wrong} of {} bytes differ",
                    want.len()
                ));
            }
        }
        assert!(bad.is_empty(), "differ from Pillow:\n{}", bad.join("\n"));
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        let out = resize(
            (&img).into(),
            5,
            4,
            Resample::Bicubic,
            [0.0, 0.0, 5.0, 4.0],
            (5, 4),
        )
        .unwrap();
        assert_eq!(out, img);
    }
}
