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

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's nearest-neighbour: the source pixel under each output centre.
fn nearest_index(in_size: u32, in0: f64, in1: f64, out_size: u32) -> Vec<usize> {
    let scale = (in1 - in0) / f64::from(out_size);
    (0..out_size)
        .map(|x| {
            let v = (in0 + (f64::from(x) + 0.5) * scale).floor();
            (v.max(0.0) as usize).min(in_size as usize - 1)
        })
        .collect()
}

/// Resizes the source box `[left, top, right, bottom]` of `img` to `w × h`
/// exactly as Pillow's `Image.resize((w, h), resample, box)` does for an RGB
/// image. `w`, `h` and the image must be non-empty. `whole` is the size of
/// the resize this is a window of (`(w, h)` for a plain resize): Pillow
/// picks its pass order from that call's sizes, and the order changes the
/// rounding.
pub(crate) fn resize(
    img: &RgbImage,
    w: u32,
    h: u32,
    resample: Resample,
    bx: [f64; 4],
    whole: (u32, u32),
) -> RgbImage {
    let (sw, sh) = img.dimensions();
    let src = img.as_raw();
    if resample == Resample::Nearest {
        let xs = nearest_index(sw, bx[0], bx[2], w);
        let ys = nearest_index(sh, bx[1], bx[3], h);
        let mut out = RgbImage::new(w, h);
        for (y, sy) in ys.iter().enumerate() {
            for (x, sx) in xs.iter().enumerate() {
                out.put_pixel(x as u32, y as u32, *img.get_pixel(*sx as u32, *sy as u32));
            }
        }
        return out;
    }
    let need_h = w != sw || bx[0] != 0.0 || bx[2] != f64::from(w);
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
    let htaps = || taps(sw, bx[0], bx[2], w, resample);
    let (out_w, out) = if vertical_first {
        let mid = match &vtaps {
            Some(vt) => vertical(src, sw as usize, 0, vt),
            None => src.to_vec(),
        };
        if need_h {
            (
                w as usize,
                horizontal(&mid, sw as usize, 0..h as usize, &htaps()),
            )
        } else {
            (sw as usize, mid)
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
            (
                w as usize,
                horizontal(src, sw as usize, row0..row1, &htaps()),
            )
        } else {
            (
                sw as usize,
                src[row0 * sw as usize * 3..row1 * sw as usize * 3].to_vec(),
            )
        };
        match &vtaps {
            None => (mid_w, mid),
            Some(vt) => (mid_w, vertical(&mid, mid_w, row0, vt)),
        }
    };
    RgbImage::from_raw(out_w as u32, h, out).unwrap_or_else(|| unreachable!("buffer is w*h*3"))
}

/// Pillow's horizontal 8-bit pass over `rows` of an RGB buffer `width`
/// pixels wide: one output row per input row, rounded and clipped to u8.
fn horizontal(src: &[u8], width: usize, rows: std::ops::Range<usize>, htaps: &[Taps]) -> Vec<u8> {
    let w = htaps.len();
    let mut mid = vec![0u8; rows.len() * w * 3];
    for (r, y) in rows.enumerate() {
        let srow = &src[y * width * 3..][..width * 3];
        let drow = &mut mid[r * w * 3..][..w * 3];
        for (xx, t) in htaps.iter().enumerate() {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, k) in t.weights.iter().enumerate() {
                let p = &srow[(t.start + i) * 3..][..3];
                for c in 0..3 {
                    acc[c] += i64::from(p[c]) * i64::from(*k);
                }
            }
            for c in 0..3 {
                drow[xx * 3 + c] = clip8(acc[c]);
            }
        }
    }
    mid
}

/// Pillow's vertical 8-bit pass: one output row per tap set, reading the
/// RGB buffer `width` pixels wide whose first row is source row `row0`.
fn vertical(src: &[u8], width: usize, row0: usize, vtaps: &[Taps]) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; vtaps.len() * stride];
    for (yy, t) in vtaps.iter().enumerate() {
        let drow = &mut out[yy * stride..][..stride];
        for (x, d) in drow.iter_mut().enumerate() {
            let mut acc = 1i64 << (PRECISION_BITS - 1);
            for (i, k) in t.weights.iter().enumerate() {
                acc += i64::from(src[(t.start - row0 + i) * stride + x]) * i64::from(*k);
            }
            *d = clip8(acc);
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

    #[test]
    fn identity_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 50, 7]));
        let out = resize(&img, 5, 4, Resample::Bicubic, [0.0, 0.0, 5.0, 4.0], (5, 4));
        assert_eq!(out, img);
    }
}
