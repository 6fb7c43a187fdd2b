//! Linear layers with int8 weights and 8-bit activations, for CPUs with
//! AVX-512 VNNI: every int8 layer there but attention's output projection
//! (the model's `Input::Wide`, which says why).
//!
//! Why: VNNI's `vpdpbusd` multiplies unsigned 8-bit activations by signed
//! 8-bit weights and adds four products at a time straight into 32-bit
//! lanes, twice the multiply-adds per instruction of the 16-bit
//! `vpdpwssd` that [`crate::int8`] uses, and without the 16-bit
//! intermediate sums that make AVX2's `vpmaddubsw` saturate. What 8-bit
//! activations cost is accuracy: each row gets its own scale and zero point
//! (asymmetric, so a row's whole 0..=255 range is used: GELU outputs are
//! lopsided, layer-norm outputs centred). Measured on the seeded ViT-B/32
//! (`gpu_check parity --precision int8` against our f32, BENCHMARKS.md),
//! mean text cosine: 0.99961 as shipped, 0.99964 with 8 bits only on the
//! layers fed by a layer norm (q/k/v, the first MLP layer), 0.99971 with
//! 16 bits everywhere; ONNX Runtime's dynamic int8 0.99931. The second MLP
//! layer in 8 bits too ran 1.1–1.3× as fast as the normed layers alone.
//!
//! Trained checkpoints can have outlier channels (in the residual stream
//! and so in the attention output; a long tail after GELU), and one scale
//! per row then leaves the other channels few levels. So each tile of six
//! rows is checked as it is quantised: a row whose range exceeds
//! [`MAX_RANGE_OVER_RMS`] times its root mean square sends its tile to the
//! 16-bit kernel (the layer keeps that layout too). That bounds the 8-bit
//! rounding error of every row that takes it relative to the row's own
//! size, whatever feeds the layer: the step is range / 255, so the error's
//! rms is at most 12 / (255 √12) ≈ 1.4 % of the row's rms. The seeded
//! ViT-B/32's rows span 6.4 (median) to 8.9 (largest) times their rms on
//! the normed layers, and no row of any layer sends a tile to 16 bits.
//!
//! `y = (Σ qx·qw − zp · Σ qw) · sx · sw + bias`, in the same 6 × 16 tiles as
//! the other packed layers ([`crate::tiled`]).

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::cpu_kernels::Epilogue;
use crate::int8::{QLinear, quantize_weights};
use crate::tiled::{
    MR, NR, RowNorm, Rows, TileOut, TiledLinear, clear_padding_tile, for_each_tile, put_row,
    rows_of_tile, with_scratch,
};

/// A row whose range (`max(x, 0) − min(x, 0)`) exceeds this many times its
/// root mean square is quantised to 16 bits, with its tile (see the module
/// docs for the number).
pub(crate) const MAX_RANGE_OVER_RMS: f32 = 12.0;

/// Whether this CPU runs [`W8A8Linear`]'s kernel. `MMEMBED_NO_W8A8=1`
/// keeps 16-bit activations everywhere (A/B runs; `MMEMBED_NO_VNNI=1` also
/// turns this off).
pub(crate) fn available() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| vnni() && !crate::cpu_kernels::env_flag("MMEMBED_NO_W8A8"))
}

/// Whether this CPU has the kernel's instructions.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::cpu_kernels::has_avx512_vnni();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A linear layer `y = x · wᵀ + b` with `w` quantised to int8 and `x` to
/// unsigned 8 bits per row at run time.
pub(crate) struct W8A8Linear {
    /// Input width.
    k: usize,
    /// Input width in groups of four (`k` rounded up, quartered).
    k4: usize,
    /// Output width.
    n: usize,
    /// Weights as `[n / NR strips][k4 groups][NR columns][4]`, zero past
    /// `k` and `n`: the layout `vpdpbusd` reads.
    w: Vec<i8>,
    /// Per output channel, the sum of its quantised weights (for the
    /// activations' zero point). Zero past `n`.
    colsum: Vec<i32>,
    /// Per output channel: float = int8 × scale. Zero past `n`.
    scale: Vec<f32>,
    /// Zero past `n`.
    bias: Vec<f32>,
    /// The same weights for 16-bit activations, for tiles with a row that
    /// 8 bits would not fit.
    wide: QLinear,
}

impl std::fmt::Debug for W8A8Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "W8A8Linear(in {}, out {})", self.k, self.n)
    }
}

/// One row's quantisation: `x ≈ (q − zp) · scale`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct RowQuant {
    scale: f32,
    zp: i32,
    /// Whether 8 bits fit the row ([`MAX_RANGE_OVER_RMS`]).
    fits: bool,
}

impl W8A8Linear {
    /// Quantises `w [n, k]` (any strides) with one scale per output row.
    pub(crate) fn new(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let k4 = k.div_ceil(4);
        let strips = n.div_ceil(NR);
        let mut packed = vec![0i8; strips * k4 * NR * 4];
        let mut colsum = vec![0i32; strips * NR];
        let (scale, bias) = quantize_weights(w, b, |c, i, q| {
            let (strip, col) = (c / NR, c % NR);
            packed[((strip * k4 + i / 4) * NR + col) * 4 + i % 4] = q;
            colsum[c] += q as i32;
        })?;
        Ok(Self {
            k,
            k4,
            n,
            w: packed,
            colsum,
            scale,
            bias,
            wide: QLinear::new(w, b)?,
        })
    }

    /// Bytes of [`Self::quantize_rows`]'s output for `m` rows.
    fn quantized_len(&self, m: usize) -> usize {
        m.div_ceil(MR) * self.k4 * MR * 4
    }

    /// Each row (layer-normed first if `norm` is given) quantised to
    /// 0..=255 with its scale and zero point, written into `q`
    /// ([`Self::quantized_len`] bytes, any contents) in tiles of `MR` rows
    /// (the last padded with zero rows), each `[k4][MR rows][4]`: the
    /// kernel broadcasts one row's four bytes at a time from one stream.
    fn quantize_rows(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        q: &mut [u8],
    ) -> Vec<RowQuant> {
        let (k, k4) = (self.k, self.k4);
        let tiles = m.div_ceil(MR);
        // Padding rows are zeros, which fit.
        let pad = RowQuant {
            fits: true,
            ..RowQuant::default()
        };
        let mut rq = vec![pad; tiles * MR];
        q.par_chunks_mut(k4 * MR * 4)
            .zip(rq.par_chunks_mut(MR))
            .enumerate()
            .for_each_init(
                || (Vec::new(), vec![0u8; 4 * k4]),
                |(normed, row), (t, (q, rq))| {
                    clear_padding_tile(q, t, m);
                    // `row` past `k` stays zero: never written.
                    rows_of_tile(x, (m, k), t, norm, normed, |lane, x| {
                        rq[lane] = quantize_row(x, &mut row[..k]);
                        put_row::<_, 4>(q, lane, row);
                    });
                },
            );
        rq
    }

    /// Integer dot products of activation tile `t` with one weight strip,
    /// dequantised into `out`.
    fn tile(&self, qx: &[u8], t: usize, strip: usize, deq: &Dequant, out: &TileOut) {
        let len = self.k4 * MR * 4;
        let a = &qx[t * len..(t + 1) * len];
        let len = self.k4 * NR * 4;
        let b = &self.w[strip * len..(strip + 1) * len];
        #[cfg(target_arch = "x86_64")]
        if vnni() {
            // SAFETY: the CPU has AVX2, FMA, AVX-512 VNNI and VL; `a` and
            // `b` hold the `k4` groups of MR rows and NR columns the kernel
            // reads.
            return unsafe { vnni::tile(a, b, self.k4, deq, out) };
        }
        let mut acc = [[0i32; NR]; MR];
        dot_generic(a, b, self.k4, &mut acc);
        // SAFETY: `out` describes a writable rectangle of the output.
        unsafe { deq.store(&acc, out) };
    }
}

impl TiledLinear for W8A8Linear {
    fn name(&self) -> &'static str {
        "cpu-w8a8-linear"
    }

    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn run(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        residual: Option<&[f32]>,
        act: Epilogue,
    ) -> Rows {
        // In this thread's scratch buffer, not a fresh zeroed one: zeroing
        // it was 9 % of a 512 × 512 layer's time at 2,464 rows.
        with_scratch(self.quantized_len(m), |qx: &mut [u8]| {
            let rq = self.quantize_rows(x, m, norm, qx);
            self.multiply(x, m, norm, (qx, &rq), residual, act)
        })
    }
}

impl W8A8Linear {
    /// [`TiledLinear::run`] after the rows were quantised.
    fn multiply(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        (qx, rq): (&[u8], &[RowQuant]),
        residual: Option<&[f32]>,
        act: Epilogue,
    ) -> Rows {
        // Tiles with a row 8 bits do not fit, quantised again to 16 bits
        // (none, on well-behaved rows: then nothing is allocated).
        let wide: Vec<bool> = rq.chunks(MR).map(|t| t.iter().any(|r| !r.fits)).collect();
        let (mut q16, mut s16) = match wide.contains(&true) {
            true => self.wide.tile_buffers(m),
            false => (Vec::new(), Vec::new()),
        };
        if !q16.is_empty() {
            q16.par_chunks_mut(self.wide.tile_len())
                .zip(s16.par_chunks_mut(MR))
                .enumerate()
                .filter(|(t, _)| wide[*t])
                .for_each_init(crate::int8::TileBufs::default, |bufs, (t, (q, s))| {
                    self.wide.quantize_tile(x, m, t, norm, (q, s), bufs)
                });
        }
        for_each_tile(m, self.n, residual, act, |tile, out| {
            if wide[tile.r0 / MR] {
                return self.wide.output_tile(&q16, &s16, tile, out);
            }
            let deq = Dequant {
                rows: &rq[tile.r0..],
                colsum: &self.colsum[tile.strip * NR..],
                scale: &self.scale[tile.strip * NR..],
                bias: &self.bias[tile.strip * NR..],
            };
            self.tile(qx, tile.r0 / MR, tile.strip, &deq, out);
        })
    }
}

/// How a tile's integer sums become floats:
/// `(acc[i][j] − zp[i] · colsum[j]) · scale_i · scale[j] + bias[j]`.
struct Dequant<'a> {
    rows: &'a [RowQuant],
    /// `NR` values each.
    colsum: &'a [i32],
    scale: &'a [f32],
    bias: &'a [f32],
}

impl Dequant<'_> {
    /// # Safety
    /// As [`TileOut::finish_row`] for each of `out.rows` rows.
    unsafe fn store(&self, acc: &[[i32; NR]; MR], out: &TileOut) {
        for (i, acc) in acc.iter().enumerate().take(out.rows) {
            let r = self.rows[i];
            let mut t = [0f32; NR];
            for (j, t) in t.iter_mut().enumerate() {
                let sum = acc[j] - r.zp * self.colsum[j];
                *t = sum as f32 * (r.scale * self.scale[j]) + self.bias[j];
            }
            // SAFETY: per the contract.
            unsafe { out.finish_row(i, &mut t) };
        }
    }
}

/// Quantises one row to 0..=255: `x ≈ (q − zp) · scale`, with zero exactly
/// representable (`zp` is an integer) so that zero padding stays zero.
fn quantize_row(x: &[f32], q: &mut [u8]) -> RowQuant {
    let RowStats { lo, hi, nan, sq } = row_stats(x);
    let scale = (hi - lo) / 255.0;
    if nan || !scale.is_finite() || scale <= 0.0 {
        // All zeros stays zeros; a non-finite row cannot be scaled and
        // becomes NaN in the output, as the f32 path would make it.
        q.fill(0);
        let scale = if !nan && scale == 0.0 { 0.0 } else { f32::NAN };
        return RowQuant {
            scale,
            zp: 0,
            fits: true,
        };
    }
    let rms = (sq / x.len() as f32).sqrt();
    let fits = hi - lo <= MAX_RANGE_OVER_RMS * rms;
    let inv = 1.0 / scale;
    let zp = (-lo * inv).round_ties_even().clamp(0.0, 255.0);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_kernels::has_avx2_fma() {
        // SAFETY: the CPU has AVX2.
        unsafe { quantize_avx2(x, q, inv, zp) };
        return RowQuant {
            scale,
            zp: zp as i32,
            fits,
        };
    }
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * inv).round_ties_even() + zp).clamp(0.0, 255.0) as u8;
    }
    RowQuant {
        scale,
        zp: zp as i32,
        fits,
    }
}

/// What [`quantize_row`] needs to know of a row.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RowStats {
    /// `min(x, 0)`.
    lo: f32,
    /// `max(x, 0)`.
    hi: f32,
    /// Whether it has a NaN.
    nan: bool,
    /// The sum of squares.
    sq: f32,
}

fn row_stats(x: &[f32]) -> RowStats {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_kernels::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { row_stats_avx2(x) };
    }
    row_stats_generic(x)
}

#[inline(always)]
fn row_stats_generic(x: &[f32]) -> RowStats {
    let (mut lo, mut hi, mut nan, mut sq) = (0f32, 0f32, false, 0f32);
    for v in x {
        lo = lo.min(*v);
        hi = hi.max(*v);
        nan |= v.is_nan();
        sq += v * v;
    }
    RowStats { lo, hi, nan, sq }
}

/// [`row_stats_generic`] eight lanes at a time. Written out: `f32::min`'s
/// NaN rule keeps the compiler from vectorising the loop (3.7 % of an int8
/// text forward as the scalar loop); here NaNs are tracked apart, so the
/// lanes' `min`/`max` need not care.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_stats_avx2(x: &[f32]) -> RowStats {
    use std::arch::x86_64::*;
    let n8 = x.len() / 8 * 8;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut sq, mut nan) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in x[..n8].chunks_exact(8) {
        // SAFETY: 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
        sq = _mm256_fmadd_ps(v, v, sq);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    }
    let lanes = |v: __m256| {
        let mut a = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    };
    let tail = row_stats_generic(&x[n8..]);
    RowStats {
        lo: lanes(lo).iter().fold(tail.lo, |a, b| a.min(*b)),
        hi: lanes(hi).iter().fold(tail.hi, |a, b| a.max(*b)),
        nan: tail.nan || _mm256_movemask_ps(nan) != 0,
        sq: lanes(sq).iter().sum::<f32>() + tail.sq,
    }
}

/// `q = clamp(round(x · inv) + zp, 0, 255)`, rounding to nearest even as
/// the scalar loop does. Written out: the compiler does not vectorise
/// Rust's saturating float-to-int casts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(x: &[f32], q: &mut [u8], inv: f32, zp: f32) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), q.len());
    let n8 = x.len() / 8 * 8;
    let (vinv, vzp) = (_mm256_set1_ps(inv), _mm256_set1_epi32(zp as i32));
    // Gathers lanes 0 and 4 (the low dword of each 128-bit half after the
    // two packs) into the low 64 bits.
    let gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
    for (c, q) in x[..n8].chunks_exact(8).zip(q[..n8].chunks_exact_mut(8)) {
        // SAFETY: 8 floats in, 8 bytes out. The rounded value plus zp is
        // within -1..=256 (x is within the row's range), and the packs
        // saturate it to 0..=255 as the scalar clamp does.
        unsafe {
            let i = _mm256_add_epi32(
                _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vinv)),
                vzp,
            );
            let w = _mm256_packs_epi32(i, i);
            let b = _mm256_packus_epi16(w, w);
            let b = _mm256_permutevar8x32_epi32(b, gather);
            _mm_storel_epi64(q.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(b));
        }
    }
    for (q, v) in q[n8..].iter_mut().zip(&x[n8..]) {
        *q = ((v * inv).round_ties_even() + zp).clamp(0.0, 255.0) as u8;
    }
}

fn dot_generic(a: &[u8], b: &[i8], k4: usize, acc: &mut [[i32; NR]; MR]) {
    for p in 0..k4 {
        let a = &a[p * MR * 4..(p + 1) * MR * 4];
        let b = &b[p * NR * 4..(p + 1) * NR * 4];
        for (acc, a) in acc.iter_mut().zip(a.chunks_exact(4)) {
            for (acc, b) in acc.iter_mut().zip(b.chunks_exact(4)) {
                *acc += a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| *a as i32 * *b as i32)
                    .sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Dequant, MR, NR, TileOut};
    use std::arch::x86_64::*;

    /// `acc[i][j] = Σ_p a[p][i][0..4] · b[p][j][0..4]` with `vpdpbusd`,
    /// dequantised into `out` in registers.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512 VNNI and VL must be available; `a` holds
    /// `k4 · MR · 4` values and `b` `k4 · NR · 4`; `out` describes a
    /// writable rectangle.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn tile(a: &[u8], b: &[i8], k4: usize, deq: &Dequant, out: &TileOut) {
        const NV: usize = NR / 8;
        assert!(a.len() >= k4 * MR * 4 && b.len() >= k4 * NR * 4);
        let mut acc = [[_mm256_setzero_si256(); NV]; MR];
        let (mut a, mut b) = (a.as_ptr() as *const i32, b.as_ptr() as *const __m256i);
        for _ in 0..k4 {
            // SAFETY (all loads): `k4` steps of MR groups and NV vectors
            // stay within the lengths asserted above.
            unsafe {
                let bv: [__m256i; NV] = std::array::from_fn(|v| _mm256_loadu_si256(b.add(v)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(a.add(i).read_unaligned());
                    for (acc, bv) in acc.iter_mut().zip(bv) {
                        *acc = _mm256_dpbusd_epi32(*acc, av, bv);
                    }
                }
                a = a.add(MR);
                b = b.add(NV);
            }
        }
        assert!(
            deq.colsum.len() >= NR
                && deq.scale.len() >= NR
                && deq.bias.len() >= NR
                && deq.rows.len() >= out.rows
        );
        // SAFETY: lengths asserted; `y` rows per the contract.
        unsafe {
            let cs: [__m256i; NV] = std::array::from_fn(|v| {
                _mm256_loadu_si256(deq.colsum.as_ptr().add(8 * v) as *const __m256i)
            });
            let s: [__m256; NV] =
                std::array::from_fn(|v| _mm256_loadu_ps(deq.scale.as_ptr().add(8 * v)));
            let bias: [__m256; NV] =
                std::array::from_fn(|v| _mm256_loadu_ps(deq.bias.as_ptr().add(8 * v)));
            for (i, acc) in acc.iter().enumerate().take(out.rows) {
                let r = deq.rows[i];
                let (zp, sr) = (_mm256_set1_epi32(r.zp), _mm256_set1_ps(r.scale));
                let y = std::array::from_fn(|v| {
                    let sum = _mm256_sub_epi32(acc[v], _mm256_mullo_epi32(zp, cs[v]));
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sr, s[v]), bias[v])
                });
                out.store_row_avx(i, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiled::{forward, forward_normed};
    use candle_core::{Device, Module};

    /// Uniform in [-0.5, 0.5) from a fixed sequence, shifted by `offset`
    /// (asymmetric rows exercise the zero point); with `outliers`, every
    /// 97th value is 20 times larger (rows 8 bits do not fit).
    fn randn(shape: &[usize], seed: u64, offset: f32, outliers: bool) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                offset + if outliers && i % 97 == 0 { u * 20.0 } else { u }
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// `x` as the kernel sees it (each row rounded to its 8-bit grid) times
    /// the dequantised weights, in f64: what the layer must give up to f32
    /// rounding, independent of the kernel's integer arithmetic.
    fn reference(l: &W8A8Linear, x: &[f32], m: usize) -> Vec<f64> {
        let (k, n) = (l.k, l.n);
        // Stale contents, as a scratch buffer has them.
        let mut qx = vec![0xa5u8; l.quantized_len(m)];
        let rq = l.quantize_rows(x, m, None, &mut qx);
        assert!(rq.iter().all(|r| r.fits), "rows 8 bits do not fit");
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            let (t, lane) = (r / MR, r % MR);
            let xr: Vec<f64> = (0..k)
                .map(|i| {
                    let q = qx[((t * l.k4 + i / 4) * MR + lane) * 4 + i % 4] as f64;
                    (q - rq[r].zp as f64) * rq[r].scale as f64
                })
                .collect();
            for c in 0..n {
                let dot: f64 = (0..k).map(|i| xr[i] * dequantized(l, c, i) as f64).sum();
                y[r * n + c] = dot + l.bias[c] as f64;
            }
        }
        y
    }

    fn dequantized(l: &W8A8Linear, c: usize, i: usize) -> f32 {
        let (strip, col) = (c / NR, c % NR);
        l.w[((strip * l.k4 + i / 4) * NR + col) * 4 + i % 4] as f32 * l.scale[c]
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        let d: f32 = a.iter().zip(b).map(|(a, b)| a * b).sum();
        d / (a.iter().map(|a| a * a).sum::<f32>() * b.iter().map(|b| b * b).sum::<f32>()).sqrt()
    }

    #[test]
    fn integer_kernel_equals_dequantised_arithmetic_on_every_edge() -> Result<()> {
        // Rows not a multiple of 6 or 48, widths not multiples of 4 or 16,
        // one row, one column; offsets make rows all-positive, all-negative
        // and mixed.
        for (m, k, n, offset) in [
            (1, 1, 1, 0.0),
            (1, 7, 3, 3.0),
            (5, 64, 16, -3.0),
            (53, 131, 37, 0.1),
            (100, 768, 200, 0.0),
        ] {
            let x = randn(&[m, k], 1, offset, false);
            let l = W8A8Linear::new(&randn(&[n, k], 2, 0.0, true), &randn(&[n], 3, 0.0, false))?;
            let want = reference(&l, &flat(&x), m);
            let got = flat(&forward(&l, &x, None, Epilogue::None)?);
            let scale = want.iter().fold(1f64, |a, v| a.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                let e = (*g as f64 - w).abs();
                assert!(e <= 2e-6 * scale, "{m}x{k}x{n}: {g} vs {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn close_to_f32_on_layer_normed_rows() -> Result<()> {
        // What the layer is for: rows out of a layer norm. Against the f32
        // layer on the same (dequantised) weights, what is left is the
        // activations' 8-bit rounding; the 16-bit layer is closer still.
        let (m, k, n) = (50, 768, 256);
        let x = randn(&[m, k], 4, 0.3, false);
        let (lw, lb) = (randn(&[k], 5, 1.0, false), randn(&[k], 6, 0.0, false));
        let (w, b) = (randn(&[n, k], 7, 0.0, true), randn(&[n], 8, 0.0, false));
        let l = W8A8Linear::new(&w, &b)?;
        let deq: Vec<f32> = (0..n * k).map(|j| dequantized(&l, j / k, j % k)).collect();
        let deq = Tensor::from_vec(deq, (n, k), &Device::Cpu)?;
        let normed = crate::cpu_kernels::layer_norm(&x, &lw, &lb, 1e-5)?;
        let want = candle_nn::Linear::new(deq, Some(b.clone())).forward(&normed)?;
        let norm = (&lw, &lb, 1e-5);
        let got = forward_normed(&l, &x, norm, None, Epilogue::None)?;
        let sixteen = forward_normed(&QLinear::new(&w, &b)?, &x, norm, None, Epilogue::None)?;
        let (mut worst8, mut worst16) = (1f32, 1f32);
        for ((g, s), w) in got
            .to_vec2::<f32>()?
            .iter()
            .zip(sixteen.to_vec2::<f32>()?)
            .zip(&want.to_vec2::<f32>()?)
        {
            worst8 = worst8.min(cos(g, w));
            worst16 = worst16.min(cos(&s, w));
        }
        assert!(
            worst8 > 0.9999,
            "8-bit activations: worst row cosine {worst8}"
        );
        assert!(
            worst16 > worst8,
            "16 bits {worst16} not closer than 8 bits {worst8}"
        );
        Ok(())
    }

    #[test]
    fn close_to_f32_on_gelu_outputs() -> Result<()> {
        // The second MLP layer's input: lopsided rows (nothing below
        // -0.17, a long positive tail), which the zero point is for.
        let (m, k, n) = (30, 3072, 64);
        let x: Vec<f32> = flat(&randn(&[m, k], 19, 0.0, false))
            .iter()
            .map(|u| {
                let v = 6.0 * u;
                v * 0.5 * (1.0 + (v * std::f32::consts::FRAC_1_SQRT_2).tanh())
            })
            .collect();
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu)?;
        let (w, b) = (randn(&[n, k], 20, 0.0, true), randn(&[n], 21, 0.0, false));
        let l = W8A8Linear::new(&w, &b)?;
        let rq = l.quantize_rows(&flat(&x), m, None, &mut vec![0; l.quantized_len(m)]);
        assert!(rq.iter().all(|r| r.fits && r.zp > 0), "{:?}", &rq[..2]);
        let deq: Vec<f32> = (0..n * k).map(|j| dequantized(&l, j / k, j % k)).collect();
        let deq = Tensor::from_vec(deq, (n, k), &Device::Cpu)?;
        let want = candle_nn::Linear::new(deq, Some(b)).forward(&x)?;
        let got = forward(&l, &x, None, Epilogue::None)?;
        for (g, w) in got.to_vec2::<f32>()?.iter().zip(&want.to_vec2::<f32>()?) {
            assert!(cos(g, w) > 0.9999, "row cosine {}", cos(g, w));
        }
        Ok(())
    }

    #[test]
    fn tiles_with_an_outlier_row_take_16_bits() -> Result<()> {
        // 20 rows (tiles of rows 0-5, 6-11, 12-17, 18-19); row 8 gets an
        // outlier 20 times the others' range (26 times its rms): its tile,
        // and only its tile, is the 16-bit layer's, bit for bit.
        let (m, k, n) = (20, 768, 40);
        let mut x = flat(&randn(&[m, k], 12, 0.0, false));
        x[8 * k + 5] = 20.0;
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu)?;
        let (w, b) = (randn(&[n, k], 13, 0.0, true), randn(&[n], 14, 0.0, false));
        let l = W8A8Linear::new(&w, &b)?;
        let rq = l.quantize_rows(&flat(&x), m, None, &mut vec![0; l.quantized_len(m)]);
        let fits: Vec<bool> = rq.iter().take(m).map(|r| r.fits).collect();
        assert_eq!(fits.iter().filter(|f| !**f).count(), 1, "{fits:?}");
        let got = forward(&l, &x, None, Epilogue::None)?.to_vec2::<f32>()?;
        let wide = forward(&QLinear::new(&w, &b)?, &x, None, Epilogue::None)?.to_vec2::<f32>()?;
        let reference = reference_rows(&l, &x, &[0, 1, 2, 3, 4, 5, 12, 18, 19])?;
        for (r, (g, w)) in got.iter().zip(&wide).enumerate() {
            if (6..12).contains(&r) {
                assert_eq!(g, w, "row {r} is not the 16-bit layer's");
            } else {
                assert_ne!(g, w, "row {r} took 16 bits");
            }
        }
        for (r, want) in reference {
            let scale = want.iter().fold(1f64, |a, v| a.max(v.abs()));
            for (g, w) in got[r].iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 2e-6 * scale, "row {r}: {g} vs {w}");
            }
        }
        Ok(())
    }

    /// [`reference`] for the given rows of `x`, each on its own (8 bits fit
    /// every one of them).
    fn reference_rows(
        l: &W8A8Linear,
        x: &Tensor,
        rows: &[usize],
    ) -> Result<Vec<(usize, Vec<f64>)>> {
        rows.iter()
            .map(|&r| Ok((r, reference(l, &flat(&x.narrow(0, r, 1)?), 1))))
            .collect()
    }

    #[test]
    fn residual_and_activation_epilogues() -> Result<()> {
        // One whole strip of 16 columns (finished in registers) and a
        // partial one (through the tile's array), rows past a whole tile.
        let (m, k, n) = (13, 64, 20);
        let x = randn(&[2, m, k], 11, 0.2, false);
        let l = W8A8Linear::new(&randn(&[n, k], 12, 0.0, true), &randn(&[n], 13, 0.0, false))?;
        let res = randn(&[2, m, n], 14, 0.0, false);
        let lin = forward(&l, &x, None, Epilogue::None)?;
        let with_res = forward(&l, &x, Some(&res), Epilogue::None)?;
        assert_eq!(flat(&with_res), flat(&(&lin + &res)?));
        let gelu = flat(&forward(&l, &x, None, Epilogue::QuickGelu)?);
        let want = flat(&(&lin * candle_nn::ops::sigmoid(&(&lin * 1.702)?)?)?);
        for (g, w) in gelu.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn zero_and_non_finite_rows() -> Result<()> {
        let (k, n) = (20, 5);
        let l = W8A8Linear::new(&randn(&[n, k], 9, 0.0, true), &randn(&[n], 10, 0.0, false))?;
        let mut rows = vec![0f32; 3 * k];
        rows[k + 3] = f32::NAN;
        rows[2 * k + 1] = f32::INFINITY;
        let x = Tensor::from_vec(rows, (3, k), &Device::Cpu)?;
        let y = forward(&l, &x, None, Epilogue::None)?.to_vec2::<f32>()?;
        // A zero row is the bias; rows with NaN or infinity are NaN.
        for (y, b) in y[0].iter().zip(&l.bias) {
            assert_eq!(y, b);
        }
        assert!(y[1].iter().chain(&y[2]).all(|v| v.is_nan()));
        let bad_bias = randn(&[n + 1], 1, 0.0, false);
        assert!(W8A8Linear::new(&randn(&[n, k], 1, 0.0, false), &bad_bias).is_err());
        Ok(())
    }

    #[test]
    fn row_quantisation_avx2_equals_scalar() {
        let x = flat(&randn(&[1, 1001], 11, 0.2, false));
        let mut q = vec![0u8; x.len()];
        let r = quantize_row(&x, &mut q);
        assert!(r.fits);
        let inv = 1.0 / r.scale;
        for (q, v) in q.iter().zip(&x) {
            let want = ((v * inv).round_ties_even() + r.zp as f32).clamp(0.0, 255.0) as u8;
            assert_eq!(*q, want);
        }
        // The row's extremes land at the ends of the grid.
        assert_eq!(q.iter().min(), Some(&0));
        assert!(*q.iter().max().unwrap() >= 254);
    }

    #[test]
    fn row_stats_avx2_equals_scalar() {
        let mut x = flat(&randn(&[1, 203], 18, 0.1, true));
        let close = |a: RowStats, b: RowStats| {
            a.lo == b.lo && a.hi == b.hi && a.nan == b.nan && (a.sq - b.sq).abs() <= 1e-5 * b.sq
        };
        assert!(close(row_stats(&x), row_stats_generic(&x)));
        // A NaN in the vector part and in the tail.
        for at in [17, 201] {
            let saved = x[at];
            x[at] = f32::NAN;
            assert!(row_stats(&x).nan, "NaN at {at} missed");
            x[at] = saved;
        }
        // All positive: the minimum is zero, not the smallest value.
        let pos: Vec<f32> = x.iter().map(|v| v.abs() + 1.0).collect();
        assert_eq!(row_stats(&pos).lo, 0.0);
    }

    #[test]
    fn generic_and_vnni_tiles_agree() {
        // Exact integer sums either way; the dequantisation may differ by
        // an FMA's rounding.
        let (k, n) = (301, 16);
        let l =
            W8A8Linear::new(&randn(&[n, k], 15, 0.0, true), &randn(&[n], 16, 0.0, false)).unwrap();
        let x = flat(&randn(&[MR, k], 17, 0.1, false));
        let mut qx = vec![0; l.quantized_len(MR)];
        let rq = l.quantize_rows(&x, MR, None, &mut qx);
        let deq = Dequant {
            rows: &rq,
            colsum: &l.colsum,
            scale: &l.scale,
            bias: &l.bias,
        };
        let run = |vnni: bool| {
            let mut y = [0f32; MR * NR];
            let out = TileOut::whole(&mut y, None, Epilogue::None);
            #[cfg(target_arch = "x86_64")]
            if vnni {
                // SAFETY: checked below that the CPU has the features.
                unsafe { vnni::tile(&qx, &l.w, l.k4, &deq, &out) };
                return y;
            }
            let _ = vnni;
            let mut acc = [[0i32; NR]; MR];
            dot_generic(&qx, &l.w, l.k4, &mut acc);
            // SAFETY: `out` is `y`.
            unsafe { deq.store(&acc, &out) };
            y
        };
        let generic = run(false);
        if vnni() {
            for (g, v) in generic.iter().zip(run(true)) {
                assert!((g - v).abs() <= 1e-5 * g.abs().max(1.0), "{g} vs {v}");
            }
        }
    }
}
