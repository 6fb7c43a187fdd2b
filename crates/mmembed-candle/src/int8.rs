//! Linear layers with int8 weights and 16-bit activations, for CPUs.
//!
//! Why this scheme: on x86-64 CPUs without AVX-512 VNNI, `vpmaddwd` (16-bit
//! pairs multiplied and summed into 32-bit lanes) does twice the
//! multiply-adds per instruction of an f32 FMA, and measured 1.7x the f32
//! FMA rate on this project's Zen 3 machines (BENCHMARKS.md). The 8-bit
//! instruction (`vpmaddubsw`) is faster still but saturates its 16-bit sums
//! unless weights are cut to 7 bits or activations to unsigned 7 bits, and
//! simulating that on ViT-B/32 dropped the mean cosine to fp32 to 0.9985 and
//! 0.9990, below the 0.999 we hold the quantised path to. Here weights are
//! int8 with one scale per output channel (quantised once, at load) and
//! each row of activations is quantised at run time to as many bits as the
//! 32-bit accumulators allow for its length (13 bits at ViT-B/32's 3072, 15
//! at 768), which makes the activations' rounding negligible: simulated,
//! 0.99969 against 0.99969 for int8 weights alone.
//!
//! On CPUs with AVX-512 VNNI (and VL) the same sums take one instruction,
//! `vpdpwssd`, where AVX2 needs `vpmaddwd` + `vpaddd`: bit for bit the same
//! results, +25 to +36 % int8 items/s on ViT-B/32 (BENCHMARKS.md). There,
//! the layers fed by a layer norm use 8-bit activations instead
//! ([`crate::w8a8`]), keeping this layer for tiles 8 bits do not fit.
//!
//! `y = (Σ qx·qw) · sx · sw + bias (+ residual)`, optionally quick-GELU'd,
//! computed in 6-row × 16-column tiles over the whole reduction (the weight
//! strip of a tile stays in L2), the tiles spread over rayon's pool.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::cpu_kernels::{Epilogue, with_f32s};
use crate::tiled::{
    MR, NR, RowNorm, Rows, Tile, TileOut, TiledLinear, clear_padding_tile, for_each_tile, put_row,
    rows_of_tile, with_scratch,
};

/// A linear layer `y = x · wᵀ + b` with `w` quantised to int8.
pub(crate) struct QLinear {
    /// Input width.
    k: usize,
    /// Input width in 16-bit pairs (`k` rounded up to even, halved).
    kp: usize,
    /// Output width.
    n: usize,
    /// Weights as `[n / NR strips][kp pairs][NR columns][2]` 16-bit values
    /// in -127..=127, zero past `k` and `n`: the layout the kernel loads.
    w: Vec<i16>,
    /// Per output channel: float = int8 × scale. Zero past `n`.
    scale: Vec<f32>,
    /// Zero past `n`.
    bias: Vec<f32>,
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QLinear(int8, in {}, out {})", self.k, self.n)
    }
}

/// Per output channel int8 quantisation of `w [n, k]` (any strides, any
/// float dtype), bias `b [n]`: calls `put(c, i, q)` with the quantised
/// weight of output `c`, input `i`, and returns the scales and the bias,
/// both zero past `n` up to whole strips.
pub(crate) fn quantize_weights(
    w: &Tensor,
    b: &Tensor,
    mut put: impl FnMut(usize, usize, i8),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, k) = w.dims2()?;
    if b.dims() != [n] {
        candle_core::bail!("int8 linear: weight [{n}, {k}], bias {:?}", b.dims());
    }
    let w = w.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let mut bias = b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let strips = n.div_ceil(NR);
    let mut scale = vec![0f32; strips * NR];
    with_f32s(&w, |w| {
        for (c, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !amax.is_finite() {
                candle_core::bail!("int8 linear: weight row {c} is not finite");
            }
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[c] = s;
            for (i, v) in row.iter().enumerate() {
                put(c, i, (v / s).round().clamp(-127.0, 127.0) as i8);
            }
        }
        Ok(())
    })?;
    bias.resize(strips * NR, 0.0);
    Ok((scale, bias))
}

impl QLinear {
    /// Quantises `w [n, k]` (any strides) with one scale per output row.
    pub(crate) fn new(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let kp = k.div_ceil(2);
        let mut packed = vec![0i16; n.div_ceil(NR) * kp * NR * 2];
        let (scale, bias) = quantize_weights(w, b, |c, i, q| {
            let (strip, col) = (c / NR, c % NR);
            packed[((strip * kp + i / 2) * NR + col) * 2 + i % 2] = q as i16;
        })?;
        Ok(Self {
            k,
            kp,
            n,
            w: packed,
            scale,
            bias,
        })
    }

    /// Largest activation magnitude that keeps `kp` pair sums of
    /// `q·127 + q·127` inside an i32.
    fn activation_max(&self) -> f32 {
        let per_pair = 2 * 127 * self.kp.max(1) as i64;
        (i32::MAX as i64 / per_pair).min(i16::MAX as i64) as f32
    }

    /// Each row (layer-normed first if `norm` is given) quantised to
    /// `±activation_max`, and its scale. The rows are laid out as the
    /// kernel reads them: in tiles of `MR` rows (the last padded with zero
    /// rows), each tile `[kp pairs][MR rows][2]`, so the kernel's broadcasts
    /// walk one contiguous stream. `q` holds [`Self::tile_len`] values per
    /// tile, any contents.
    fn quantize_rows(
        &self,
        x: &[f32],
        m: usize,
        norm: Option<&RowNorm>,
        q: &mut [i16],
    ) -> Vec<f32> {
        let mut scales = vec![0f32; m.div_ceil(MR) * MR];
        q.par_chunks_mut(self.tile_len())
            .zip(scales.par_chunks_mut(MR))
            .enumerate()
            .for_each_init(TileBufs::default, |bufs, (t, (q, s))| {
                self.quantize_tile(x, m, t, norm, (q, s), bufs)
            });
        scales
    }

    /// Zeroed buffers for [`Self::quantize_tile`]'s output over `m` rows
    /// (the 8-bit layer's 16-bit fallback tiles).
    pub(crate) fn tile_buffers(&self, m: usize) -> (Vec<i16>, Vec<f32>) {
        let tiles = m.div_ceil(MR);
        (vec![0i16; tiles * self.tile_len()], vec![0f32; tiles * MR])
    }

    /// Values in one quantised activation tile.
    pub(crate) fn tile_len(&self) -> usize {
        self.kp * MR * 2
    }

    /// Tile `t` of [`Self::quantize_rows`]: its `MR` rows into `q`
    /// ([`Self::tile_len`] values) and their scales into `s`.
    pub(crate) fn quantize_tile(
        &self,
        x: &[f32],
        m: usize,
        t: usize,
        norm: Option<&RowNorm>,
        (q, s): (&mut [i16], &mut [f32]),
        bufs: &mut TileBufs,
    ) {
        let (k, kp) = (self.k, self.kp);
        let qmax = self.activation_max();
        // Zero past `k` (the odd pair's second half): only `..k` is ever
        // written, so the task's buffer is zeroed once, as w8a8's is.
        if bufs.row.len() < 2 * kp {
            bufs.row.resize(2 * kp, 0);
        }
        let row = &mut bufs.row[..2 * kp];
        clear_padding_tile(q, t, m);
        rows_of_tile(x, (m, k), t, norm, &mut bufs.normed, |lane, x| {
            s[lane] = quantize_row(x, &mut row[..k], qmax);
            put_row::<_, 2>(q, lane, row);
        });
    }

    /// Output tile `tile` from [`Self::quantize_rows`]'s `qx` and `sx`.
    pub(crate) fn output_tile(&self, qx: &[i16], sx: &[f32], tile: &Tile, out: &TileOut) {
        let deq = Dequant {
            row_scale: &sx[tile.r0..],
            scale: &self.scale[tile.strip * NR..],
            bias: &self.bias[tile.strip * NR..],
        };
        self.tile(qx, tile.r0 / MR, tile.strip, &deq, out);
    }

    /// Integer dot products of activation tile `t` (rows `MR t..MR t + MR`)
    /// with one weight strip, dequantised into `out`.
    fn tile(&self, qx: &[i16], t: usize, strip: usize, deq: &Dequant, out: &TileOut) {
        let len = self.kp * MR * 2;
        let a = &qx[t * len..(t + 1) * len];
        let len = self.kp * NR * 2;
        let b = &self.w[strip * len..(strip + 1) * len];
        #[cfg(target_arch = "x86_64")]
        if crate::cpu_kernels::has_avx2_fma() {
            // SAFETY: the CPU has AVX2; `a` and `b` hold the `kp` pairs of
            // MR rows and NR columns the kernel reads.
            return unsafe {
                if crate::cpu_kernels::has_avx512_vnni() {
                    avx2::tile_vnni(a, b, self.kp, deq, out)
                } else {
                    avx2::tile(a, b, self.kp, deq, out)
                }
            };
        }
        let mut acc = [[0i32; NR]; MR];
        dot_generic(a, b, self.kp, &mut acc);
        // SAFETY: `out` describes a writable rectangle of the output.
        unsafe { deq.store(&acc, out) };
    }
}

/// A parallel task's buffers for [`QLinear::quantize_tile`], reused
/// across its tiles.
#[derive(Default)]
pub(crate) struct TileBufs {
    normed: Vec<f32>,
    row: Vec<i16>,
}

impl TiledLinear for QLinear {
    fn name(&self) -> &'static str {
        "cpu-int8-linear"
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
        // In this thread's scratch buffer, not a fresh zeroed one (as
        // `W8A8Linear::run`).
        with_scratch(m.div_ceil(MR) * self.tile_len(), |qx: &mut [i16]| {
            let sx = self.quantize_rows(x, m, norm, qx);
            let qx = &*qx;
            for_each_tile(m, self.n, residual, act, |tile, out| {
                self.output_tile(qx, &sx, tile, out)
            })
        })
    }
}

/// How a tile's integer sums become floats:
/// `acc[i][j] · row_scale[i] · scale[j] + bias[j]`.
struct Dequant<'a> {
    row_scale: &'a [f32],
    /// `NR` values.
    scale: &'a [f32],
    /// `NR` values.
    bias: &'a [f32],
}

impl Dequant<'_> {
    /// # Safety
    /// As [`TileOut::finish_row`] for each of `out.rows` rows.
    unsafe fn store(&self, acc: &[[i32; NR]; MR], out: &TileOut) {
        for (i, acc) in acc.iter().enumerate().take(out.rows) {
            let mut t = [0f32; NR];
            for (j, t) in t.iter_mut().enumerate() {
                *t = acc[j] as f32 * (self.row_scale[i] * self.scale[j]) + self.bias[j];
            }
            // SAFETY: per the contract.
            unsafe { out.finish_row(i, &mut t) };
        }
    }
}

/// Quantises one row to `±qmax`, returns its scale.
fn quantize_row(x: &[f32], q: &mut [i16], qmax: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_kernels::has_avx2_fma() {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_row_avx2(x, q, qmax) };
    }
    quantize_row_generic(x, q, qmax)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_row_avx2(x: &[f32], q: &mut [i16], qmax: f32) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), q.len());
    // Written out: the compiler does not vectorise Rust's saturating
    // float-to-int casts.
    let n8 = x.len() / 8 * 8;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let (mut m, mut nan) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in x[..n8].chunks_exact(8) {
        // SAFETY: 8 floats.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        m = _mm256_max_ps(m, _mm256_and_ps(v, abs));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = if _mm256_movemask_ps(nan) != 0 {
        f32::NAN
    } else {
        abs_max(lanes.iter().chain(&x[n8..]))
    };
    if !(amax > 0.0 && amax.is_finite()) {
        q.fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = qmax / amax;
    let vinv = _mm256_set1_ps(inv);
    for (c, q) in x[..n8].chunks_exact(8).zip(q[..n8].chunks_exact_mut(8)) {
        // SAFETY: 8 floats in, 8 i16s out. |v · inv| <= qmax < 32768, so
        // the rounding conversion and the saturating pack are exact.
        unsafe {
            let i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vinv));
            let packed = _mm256_packs_epi32(i, i);
            let packed = _mm256_permute4x64_epi64::<0b1000>(packed);
            _mm_storeu_si128(
                q.as_mut_ptr() as *mut __m128i,
                _mm256_castsi256_si128(packed),
            );
        }
    }
    for (q, v) in q[n8..].iter_mut().zip(&x[n8..]) {
        *q = (v * inv).round_ties_even() as i16;
    }
    amax / qmax
}

/// The largest magnitude, NaN if any value is NaN.
#[inline(always)]
fn abs_max<'a>(x: impl IntoIterator<Item = &'a f32>) -> f32 {
    x.into_iter().fold(0f32, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v.abs())
        }
    })
}

#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [i16], qmax: f32) -> f32 {
    let amax = abs_max(x);
    if !(amax > 0.0 && amax.is_finite()) {
        // All zeros stays zeros; a non-finite row cannot be scaled and
        // becomes NaN in the output, as the f32 path would make it.
        q.fill(0);
        return if amax == 0.0 { 0.0 } else { f32::NAN };
    }
    let inv = qmax / amax;
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even() as i32 as i16;
    }
    amax / qmax
}

fn dot_generic(a: &[i16], b: &[i16], kp: usize, acc: &mut [[i32; NR]; MR]) {
    for p in 0..kp {
        let a = &a[p * MR * 2..(p + 1) * MR * 2];
        let b = &b[p * NR * 2..(p + 1) * NR * 2];
        for (acc, a) in acc.iter_mut().zip(a.chunks_exact(2)) {
            for (acc, b) in acc.iter_mut().zip(b.chunks_exact(2)) {
                *acc += a[0] as i32 * b[0] as i32 + a[1] as i32 * b[1] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Dequant, MR, NR, TileOut};
    use std::arch::x86_64::*;

    /// [`tile_with`] with AVX2's `vpmaddwd` + `vpaddd`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; otherwise as [`tile_with`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(a: &[i16], b: &[i16], kp: usize, deq: &Dequant, out: &TileOut) {
        // SAFETY: this function's features are the body's; the rest is the
        // caller's contract.
        unsafe {
            tile_with(a, b, kp, deq, out, |acc, av, bv| {
                _mm256_add_epi32(acc, _mm256_madd_epi16(av, bv))
            })
        }
    }

    /// [`tile_with`] with AVX-512 VNNI's `vpdpwssd` on 256-bit registers:
    /// the same 16-bit pair products and 32-bit sums as [`tile`] (so the
    /// same results, bit for bit), one instruction where AVX2 needs two.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512 VNNI and VL must be available; otherwise as
    /// [`tile_with`].
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn tile_vnni(a: &[i16], b: &[i16], kp: usize, deq: &Dequant, out: &TileOut) {
        // SAFETY: as in `tile`.
        unsafe {
            tile_with(a, b, kp, deq, out, |acc, av, bv| {
                _mm256_dpwssd_epi32(acc, av, bv)
            })
        }
    }

    /// `acc[i][j] = Σ_p a[p][i][0..2] · b[p][j][0..2]` (`mac(acc, a, b)`
    /// adds the pair products of `a` and `b` to `acc`, lane by lane),
    /// dequantised into `out` in registers. Inlined into each caller, so
    /// it is compiled with that caller's features.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `a` holds `kp · MR · 2` values and
    /// `b` `kp · NR · 2`; `out` describes a writable rectangle.
    #[inline(always)]
    unsafe fn tile_with(
        a: &[i16],
        b: &[i16],
        kp: usize,
        deq: &Dequant,
        out: &TileOut,
        mac: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        const NV: usize = NR / 8;
        assert!(a.len() >= kp * MR * 2 && b.len() >= kp * NR * 2);
        // SAFETY (all intrinsics): AVX2 per the contract.
        let mut acc = [[unsafe { _mm256_setzero_si256() }; NV]; MR];
        let (mut a, mut b) = (a.as_ptr() as *const i32, b.as_ptr() as *const __m256i);
        for _ in 0..kp {
            // SAFETY (all loads): `kp` steps of MR pairs and NV vectors stay
            // within the lengths asserted above.
            unsafe {
                let bv: [__m256i; NV] = std::array::from_fn(|v| _mm256_loadu_si256(b.add(v)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32(a.add(i).read_unaligned());
                    for (acc, bv) in acc.iter_mut().zip(bv) {
                        *acc = mac(*acc, av, bv);
                    }
                }
                a = a.add(MR);
                b = b.add(NV);
            }
        }
        assert!(deq.scale.len() >= NR && deq.bias.len() >= NR && deq.row_scale.len() >= out.rows);
        // SAFETY: lengths asserted; `y` rows per the contract.
        unsafe {
            let s: [__m256; NV] =
                std::array::from_fn(|v| _mm256_loadu_ps(deq.scale.as_ptr().add(8 * v)));
            let bias: [__m256; NV] =
                std::array::from_fn(|v| _mm256_loadu_ps(deq.bias.as_ptr().add(8 * v)));
            for (i, acc) in acc.iter().enumerate().take(out.rows) {
                let sr = _mm256_set1_ps(deq.row_scale[i]);
                let y = std::array::from_fn(|v| {
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[v]), _mm256_mul_ps(sr, s[v]), bias[v])
                });
                out.store_row_avx(i, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_kernels::Epilogue;
    use crate::tiled::{forward, forward_normed};
    use candle_core::{DType, Device, Module};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A fixed pseudo-random pattern with outliers, so per-row scales
        // matter.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 { u * 20.0 } else { u }
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let sum_sq = |t: &Tensor| {
            t.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
        };
        let d = sum_sq(&(a - b).unwrap()).unwrap();
        (d / sum_sq(b).unwrap()).sqrt()
    }

    #[test]
    fn matches_f32_within_int8_rounding_for_odd_shapes() -> Result<()> {
        // Odd input width, output not a multiple of 16, rows not a multiple
        // of 6 or of a task's 48: every edge of the tiling.
        for (m, k, n) in [(1, 7, 3), (53, 131, 37), (100, 768, 200)] {
            let x = randn(&[m, k], 1);
            let w = randn(&[n, k], 2);
            let b = randn(&[n], 3);
            let want = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
            let q = QLinear::new(&w, &b)?;
            let got = forward(&q, &x, None, Epilogue::None)?;
            assert_eq!(got.dims(), [m, n]);
            // Rows with a 20x outlier get a coarse scale: a few percent is
            // what int8 per-channel rounding costs on such weights.
            let e = rel_err(&got, &want);
            assert!(e < 0.05, "{m}x{k}x{n}: relative error {e}");
            // Exactly what dequantised weights give (activations at 13+ bits
            // are close to exact): the error is the weights' rounding only.
            let deq = dequantized(&q)?;
            let exact = candle_nn::Linear::new(deq, Some(b.clone())).forward(&x)?;
            let e = rel_err(&got, &exact);
            assert!(e < 2e-4, "{m}x{k}x{n}: error beyond weight rounding {e}");
        }
        Ok(())
    }

    /// The quantised weights back as f32 `[n, k]`.
    fn dequantized(q: &QLinear) -> Result<Tensor> {
        let mut w = vec![0f32; q.n * q.k];
        for c in 0..q.n {
            for i in 0..q.k {
                let v = q.w[((c / NR * q.kp + i / 2) * NR + c % NR) * 2 + i % 2];
                w[c * q.k + i] = v as f32 * q.scale[c];
            }
        }
        Tensor::from_vec(w, (q.n, q.k), &Device::Cpu)
    }

    #[test]
    fn generic_and_avx2_tiles_agree_exactly() {
        let (k, n, m) = (301, 16, 6);
        let w = randn(&[n, k], 4);
        let q = QLinear::new(&w, &Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let x = randn(&[m, k], 5).to_vec2::<f32>().unwrap().concat();
        let mut qx = vec![0x55; m.div_ceil(MR) * q.tile_len()];
        q.quantize_rows(&x, m, None, &mut qx);
        let mut acc = [[0i32; NR]; MR];
        dot_generic(&qx, &q.w, q.kp, &mut acc);
        assert!(acc.iter().flatten().any(|&v| v != 0));
        let sx = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0];
        let res: Vec<f32> = (0..MR * NR).map(|i| i as f32).collect();
        let (mut want, mut got) = ([0f32; MR * NR], [0f32; MR * NR]);
        let deq = Dequant {
            row_scale: &sx,
            scale: &q.scale,
            bias: &q.bias,
        };
        let out = TileOut::whole;
        for (residual, act) in [
            (None, Epilogue::None),
            (Some(res.as_slice()), Epilogue::None),
            (None, Epilogue::QuickGelu),
            (None, Epilogue::GeluTanh),
            (None, Epilogue::GeluErf),
        ] {
            // SAFETY: 6 rows of 16 floats.
            unsafe { deq.store(&acc, &out(&mut want, residual, act)) };
            q.tile(&qx, 0, 0, &deq, &out(&mut got, residual, act));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_vnni_kernels_give_the_same_bits() {
        // Same 16-bit pair products, same 32-bit sums: `vpdpwssd` is
        // `vpmaddwd` + `vpaddd` in one instruction (checked where the CPU
        // has both; CI machines without VNNI run the AVX2 one elsewhere).
        if !crate::cpu_kernels::has_avx512_vnni() {
            return;
        }
        let (k, n, m) = (3072, 16, 6);
        let q = QLinear::new(&randn(&[n, k], 6), &randn(&[n], 7)).unwrap();
        let x = randn(&[m, k], 8).to_vec2::<f32>().unwrap().concat();
        let mut qx = vec![0x55; m.div_ceil(MR) * q.tile_len()];
        let sx = q.quantize_rows(&x, m, None, &mut qx);
        let deq = Dequant {
            row_scale: &sx,
            scale: &q.scale,
            bias: &q.bias,
        };
        let run = |vnni: bool| {
            let mut y = [0f32; MR * NR];
            let out = TileOut::whole(&mut y, None, Epilogue::None);
            // SAFETY: the CPU has AVX2, FMA, VNNI and VL (checked above);
            // `qx` and `q.w` hold one tile and one strip; `out` is `y`.
            unsafe {
                if vnni {
                    avx2::tile_vnni(&qx, &q.w, q.kp, &deq, &out)
                } else {
                    avx2::tile(&qx, &q.w, q.kp, &deq, &out)
                }
            };
            y
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn layer_norm_folded_into_quantisation_is_exactly_norm_then_linear() -> Result<()> {
        let (m, k, n) = (13, 96, 40);
        let x = (randn(&[2, m, k], 10) * 3.0)?.affine(1.0, 0.5)?;
        let (w, b) = (randn(&[n, k], 11), randn(&[n], 12));
        let (lw, lb) = (randn(&[k], 13), randn(&[k], 14));
        let res = randn(&[2, m, n], 15);
        let q = QLinear::new(&w, &b)?;
        let normed = crate::cpu_kernels::layer_norm(&x, &lw, &lb, 1e-5)?;
        for (residual, epilogue) in [
            (None, Epilogue::None),
            (None, Epilogue::QuickGelu),
            (Some(&res), Epilogue::None),
        ] {
            let want = forward(&q, &normed, residual, epilogue)?;
            let got = forward_normed(&q, &x, (&lw, &lb, 1e-5), residual, epilogue)?;
            assert_eq!(got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        }
        let short = randn(&[k - 1], 16);
        assert!(forward_normed(&q, &x, (&short, &lb, 1e-5), None, Epilogue::None).is_err());
        Ok(())
    }

    #[test]
    fn vector_and_scalar_row_quantisation_agree_exactly() {
        for len in [1, 7, 8, 131, 768] {
            let x = randn(&[len], len as u64).to_vec1::<f32>().unwrap();
            let (mut a, mut b) = (vec![0i16; len], vec![0i16; len]);
            let sa = quantize_row(&x, &mut a, 4095.0);
            let sb = quantize_row_generic(&x, &mut b, 4095.0);
            assert_eq!((sa, &a), (sb, &b), "length {len}");
            assert!(
                a.iter().any(|&v| v.abs() == 4095),
                "the largest value maps to qmax"
            );
        }
    }

    #[test]
    fn epilogues_and_edge_rows() -> Result<()> {
        let (m, k, n) = (13, 64, 20);
        let x = randn(&[2, m, k], 6);
        let w = randn(&[n, k], 7);
        let b = randn(&[n], 8);
        let res = randn(&[2, m, n], 9);
        let q = QLinear::new(&w, &b)?;
        let lin = forward(&q, &x, None, Epilogue::None)?;
        let with_res = forward(&q, &x, Some(&res), Epilogue::None)?;
        assert!(rel_err(&with_res, &(&lin + &res)?) < 1e-6);
        let gelu = forward(&q, &x, None, Epilogue::QuickGelu)?;
        let want = (&lin * candle_nn::ops::sigmoid(&(&lin * 1.702)?)?)?;
        assert!(rel_err(&gelu, &want) < 1e-5);
        // A zero row stays exactly the bias; a row with inf becomes NaN
        // rather than a wrong finite number.
        let mut rows = x.flatten_to(1)?.to_vec2::<f32>()?;
        rows[0].fill(0.0);
        rows[1][3] = f32::INFINITY;
        rows[2][63] = f32::NAN;
        rows[3][9] = f32::NAN;
        let x = Tensor::new(rows, &Device::Cpu)?;
        let y = forward(&q, &x, None, Epilogue::None)?.to_vec2::<f32>()?;
        assert_eq!(y[0], b.to_vec1::<f32>()?);
        for (r, row) in y.iter().enumerate().take(4).skip(1) {
            assert!(row.iter().all(|v| v.is_nan()), "row {r}");
        }
        assert!(y[4].iter().all(|v| v.is_finite()));
        assert!(forward(&q, &randn(&[3, 63], 1), None, Epilogue::None).is_err());
        assert!(forward(&q, &x, Some(&res), Epilogue::QuickGelu).is_err());
        Ok(())
    }
}
