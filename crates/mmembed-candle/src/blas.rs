//! The GEMM calls of the CUDA graph ([`crate::Kernels::Cublas`]), as plain
//! data in cuBLAS's own terms, and a reference implementation of what
//! cuBLAS computes for them.
//!
//! Each call is a [`Gemm`]: column-major operands with leading dimensions,
//! strided batches and offsets into flat buffers, exactly the arguments of
//! `cublasGemmStridedBatchedEx` and `cublasLtMatmul`. The CUDA ops
//! ([`crate::blas_ops`]) pass them on field by field; on the CPU,
//! [`Gemm::run`] computes the same function from cuBLAS's documented
//! semantics. So the index arithmetic that lets attention read the packed
//! Q/K/V projections in place and write the merged heads in place (no
//! head-split or merge copies, the second largest cost of the GPU graph
//! before, see BENCHMARKS.md) is tested on the CPU, against PyTorch,
//! through the whole model (tests/parity.rs), not only on a lent GPU.
//!
//! Row-major tensors meet column-major cuBLAS through the usual identity: a
//! row-major `[r, c]` matrix with row stride `s` is the column-major
//! `c × r` matrix with leading dimension `s`, its transpose. So
//! `Y = X · Wᵀ` (row-major) is `Yᵀ = W · Xᵀ`, i.e. `C = op(A) · op(B)`
//! with `A` the weight read transposed and `B` the rows as they are.

use candle_core::Result;

/// One (strided-batched) GEMM: for each batch `p`,
/// `C_p = op(A_p) · op(B_p) + beta · C_p (+ bias)`, column-major, where
/// `X_p` starts at `x_offset + p · stride_x` of its buffer and `op` is a
/// transpose where `trans*` says so. `op(A)` is `m × k`, `op(B)` `k × n`,
/// `C` `m × n`. A bias (cuBLASLt's epilogue) has `m` values, one per row
/// of `C`, added to every column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub a_offset: usize,
    pub b_offset: usize,
    pub c_offset: usize,
    /// `C` accumulated into (`1`: the residual of a linear layer, the mask
    /// of attention scores) or overwritten (`0`).
    pub accumulate: bool,
}

impl Gemm {
    /// One unbatched call `C = op(A) · op(B)` at the buffers' starts, the
    /// fields the constructors below then set.
    fn new(
        (transa, transb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (lda, ldb, ldc): (usize, usize, usize),
        accumulate: bool,
    ) -> Self {
        Self {
            transa,
            transb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            a_offset: 0,
            b_offset: 0,
            c_offset: 0,
            accumulate,
        }
    }

    /// `y [rows, out] = x [rows, inp] · w [out, inp]ᵀ (+ bias [out])`, all
    /// row-major and contiguous: `A = w` (read transposed), `B = x`, `C = y`.
    pub(crate) fn linear(rows: usize, inp: usize, out: usize, accumulate: bool) -> Self {
        Self::new((true, false), (out, rows, inp), (inp, inp, out), accumulate)
    }

    /// The patch embedding of `images` images of `n` patches (`patches
    /// [images · n, inp]`, weight `w [d, inp]`), each image's rows written
    /// after its first `prefix` rows (the class token) of `out [images, n
    /// + prefix, d]` and added to what those rows hold (the positions):
    /// `A = w` (read transposed, the same for every image: batch stride 0),
    /// `B = patches`, `C = out`.
    pub(crate) fn patches(images: usize, n: usize, inp: usize, d: usize, prefix: usize) -> Self {
        Self {
            batch: images,
            stride_b: n * inp,
            stride_c: (n + prefix) * d,
            c_offset: prefix * d,
            ..Self::new((true, false), (d, n, inp), (inp, inp, d), true)
        }
    }

    /// Attention scores from packed projections `qkv [b, t, 3d]` (q, k, v
    /// side by side, each `heads × dh`), read in place, into `scores
    /// [heads, b, t, t]`: `scores[h, s] = q_{s,h} · k_{s,h}ᵀ` (row-major `t ×
    /// t`, query by key), `+` what `scores` holds when `masked`. `A = qkv`
    /// at the keys (read transposed), `B = qkv` at the queries, `C =
    /// scores`. One call per head batched over the sequences, or one per
    /// sequence batched over the heads, whichever makes fewer calls (one
    /// image: 1 call, not 12).
    pub(crate) fn scores(shape: Heads, masked: bool) -> Vec<Self> {
        let Heads { b, t, heads, dh } = shape;
        let d = heads * dh;
        let base = Self::new((true, false), (t, t, dh), (3 * d, 3 * d, t), masked);
        shape.split(|at| Self {
            batch: at.batch,
            stride_a: at.step(t * 3 * d, dh),
            stride_b: at.step(t * 3 * d, dh),
            stride_c: at.step(t * t, b * t * t),
            a_offset: at.seq * t * 3 * d + d + at.head * dh,
            b_offset: at.seq * t * 3 * d + at.head * dh,
            c_offset: (at.head * b + at.seq) * t * t,
            ..base
        })
    }

    /// Each head's output, `probs[h, s] · v_{s,h}`, written in place into
    /// the merged rows `out [b, t, d]` (head `h`'s `dh` columns of them):
    /// `A = qkv` at the values, `B = probs [heads, b, t, t]`, `C = out`.
    /// Split into calls as [`Gemm::scores`].
    pub(crate) fn values(shape: Heads) -> Vec<Self> {
        let Heads { b, t, heads, dh } = shape;
        let d = heads * dh;
        let base = Self::new((false, false), (dh, t, t), (3 * d, t, d), false);
        shape.split(|at| Self {
            batch: at.batch,
            stride_a: at.step(t * 3 * d, dh),
            stride_b: at.step(t * t, b * t * t),
            stride_c: at.step(t * d, dh),
            a_offset: at.seq * t * 3 * d + 2 * d + at.head * dh,
            b_offset: (at.head * b + at.seq) * t * t,
            c_offset: at.seq * t * d + at.head * dh,
            ..base
        })
    }

    /// The stored shape (rows, columns) of `A` and `B` before `op`.
    pub(crate) fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }

    /// Checks the call against its buffers' lengths (in elements) and
    /// cuBLAS's rules (leading dimensions at least the stored rows), so no
    /// call reads or writes outside them: on a GPU that would be silent
    /// corruption or a fault that kills the process, not an error.
    pub(crate) fn check(&self, a_len: usize, b_len: usize, c_len: usize) -> Result<()> {
        let ((ar, ac), (br, bc)) = self.stored();
        let extent = |what: &str,
                      rows: usize,
                      cols: usize,
                      ld: usize,
                      offset: usize,
                      stride: usize,
                      len: usize|
         -> Result<()> {
            if ld < rows.max(1) {
                candle_core::bail!("gemm: leading dimension {ld} of {what} under its {rows} rows");
            }
            if rows == 0 || cols == 0 || self.batch == 0 {
                return Ok(());
            }
            let last = (self.batch - 1)
                .checked_mul(stride)
                .and_then(|s| s.checked_add(offset))
                .and_then(|s| s.checked_add((cols - 1).checked_mul(ld)?))
                .and_then(|s| s.checked_add(rows - 1));
            match last {
                Some(last) if last < len => Ok(()),
                _ => candle_core::bail!(
                    "gemm: {what} ({rows} x {cols}, ld {ld}, offset {offset}, {} batches of \
                     stride {stride}) reaches past its {len} elements",
                    self.batch
                ),
            }
        };
        extent("A", ar, ac, self.lda, self.a_offset, self.stride_a, a_len)?;
        extent("B", br, bc, self.ldb, self.b_offset, self.stride_b, b_len)?;
        extent(
            "C",
            self.m,
            self.n,
            self.ldc,
            self.c_offset,
            self.stride_c,
            c_len,
        )
    }

    /// What cuBLAS computes for this call (f32 accumulation, as the CUDA
    /// path asks of it: `CUBLAS_COMPUTE_32F`), on host buffers: the
    /// reference the CPU runs of [`crate::Kernels::Cublas`] go through.
    /// With a bias it is cuBLASLt's `CUBLASLT_EPILOGUE_BIAS`: `alpha · AB +
    /// beta · C + bias`.
    pub(crate) fn run(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        bias: Option<&[f32]>,
    ) -> Result<()> {
        self.check(a.len(), b.len(), c.len())?;
        if let Some(bias) = bias
            && bias.len() != self.m
        {
            candle_core::bail!("gemm: {} bias values for {} rows", bias.len(), self.m);
        }
        for p in 0..self.batch {
            let (a0, b0, c0) = (
                self.a_offset + p * self.stride_a,
                self.b_offset + p * self.stride_b,
                self.c_offset + p * self.stride_c,
            );
            for j in 0..self.n {
                for i in 0..self.m {
                    let mut acc = 0f32;
                    for l in 0..self.k {
                        let x = if self.transa {
                            a[a0 + l + i * self.lda]
                        } else {
                            a[a0 + i + l * self.lda]
                        };
                        let y = if self.transb {
                            b[b0 + j + l * self.ldb]
                        } else {
                            b[b0 + l + j * self.ldb]
                        };
                        acc += x * y;
                    }
                    let at = c0 + i + j * self.ldc;
                    if self.accumulate {
                        acc += c[at];
                    }
                    if let Some(bias) = bias {
                        acc += bias[i];
                    }
                    c[at] = acc;
                }
            }
        }
        Ok(())
    }
}

/// The shape of multi-head attention over packed projections: `b`
/// sequences of `t` tokens, `heads` heads of `dh` values each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heads {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub dh: usize,
}

impl Heads {
    /// From packed projections `[b, t, 3d]` and the head count.
    pub(crate) fn of(dims: (usize, usize, usize), heads: usize) -> Result<Self> {
        let (b, t, d3) = dims;
        if heads == 0 || d3 % 3 != 0 || (d3 / 3) % heads != 0 {
            candle_core::bail!("attention: width {d3} is not 3 x {heads} heads");
        }
        Ok(Self {
            b,
            t,
            heads,
            dh: d3 / 3 / heads,
        })
    }

    /// One call per head (batched over the sequences) or per sequence
    /// (batched over the heads), whichever is fewer; `call` makes a call
    /// from where it starts and what it batches over.
    fn split(&self, call: impl Fn(Start) -> Gemm) -> Vec<Gemm> {
        if self.heads <= self.b {
            (0..self.heads)
                .map(|head| {
                    call(Start {
                        head,
                        seq: 0,
                        batch: self.b,
                        over_heads: false,
                    })
                })
                .collect()
        } else {
            (0..self.b)
                .map(|seq| {
                    call(Start {
                        head: 0,
                        seq,
                        batch: self.heads,
                        over_heads: true,
                    })
                })
                .collect()
        }
    }

    /// Elements of the scores for every head, `[heads, b, t, t]`.
    pub(crate) fn scores_len(&self) -> usize {
        self.heads * self.b * self.t * self.t
    }
}

/// Where one attention call starts and what its batch runs over.
#[derive(Debug, Clone, Copy)]
struct Start {
    head: usize,
    seq: usize,
    batch: usize,
    over_heads: bool,
}

impl Start {
    /// The batch stride: `per_seq` when the batch runs over sequences,
    /// `per_head` when over heads.
    fn step(&self, per_seq: usize, per_head: usize) -> usize {
        if self.over_heads { per_head } else { per_seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4, "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn linear_is_rows_times_the_transposed_weight_plus_bias_and_residual() {
        let (rows, inp, out) = (5, 7, 3);
        let (x, w, bias, res) = (
            values(rows * inp, 1),
            values(out * inp, 2),
            values(out, 3),
            values(rows * out, 4),
        );
        let mut want = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let dot: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
                want[r * out + o] = dot + bias[o] + res[r * out + o];
            }
        }
        let mut y = res.clone();
        Gemm::linear(rows, inp, out, true)
            .run(&w, &x, &mut y, Some(&bias))
            .unwrap();
        close(&y, &want);
    }

    /// Attention by the scores and values calls against attention written
    /// out with the heads split the obvious way, for both ways of
    /// splitting the calls (more sequences than heads, and fewer).
    #[test]
    fn attention_calls_read_packed_projections_and_write_merged_heads() {
        for (b, heads) in [(3, 2), (2, 3), (1, 4), (2, 2)] {
            attention_against_loops(Heads {
                b,
                t: 4,
                heads,
                dh: 5,
            });
        }
    }

    fn attention_against_loops(shape: Heads) {
        let Heads { b, t, heads, dh } = shape;
        let d = heads * dh;
        let qkv = values(b * t * 3 * d, 5);
        let mask = values(b * t * t, 6);
        let at = |s: usize, tok: usize, part: usize, h: usize, e: usize| {
            qkv[(s * t + tok) * 3 * d + part * d + h * dh + e]
        };
        // Scores with the mask added, then an arbitrary per-row map (the
        // calls do not care what happens between them), then values.
        let mut want_scores = vec![0f32; heads * b * t * t];
        let mut want_out = vec![0f32; b * t * d];
        for h in 0..heads {
            for s in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        let dot: f32 = (0..dh).map(|e| at(s, i, 0, h, e) * at(s, j, 1, h, e)).sum();
                        want_scores[((h * b + s) * t + i) * t + j] =
                            dot + mask[(s * t + i) * t + j];
                    }
                }
            }
        }
        let probs: Vec<f32> = want_scores.iter().map(|v| v * 0.5).collect();
        for h in 0..heads {
            for s in 0..b {
                for i in 0..t {
                    for e in 0..dh {
                        want_out[(s * t + i) * d + h * dh + e] = (0..t)
                            .map(|j| probs[((h * b + s) * t + i) * t + j] * at(s, j, 2, h, e))
                            .sum();
                    }
                }
            }
        }
        let mut scores = mask.repeat(heads);
        let calls = Gemm::scores(shape, true);
        assert_eq!(calls.len(), heads.min(b));
        for g in calls {
            g.run(&qkv, &qkv, &mut scores, None).unwrap();
        }
        close(&scores, &want_scores);
        let mut out = vec![f32::NAN; b * t * d];
        for g in Gemm::values(shape) {
            g.run(&qkv, &probs, &mut out, None).unwrap();
        }
        close(&out, &want_out);
    }

    /// The patch embedding writes each image's patches after its class row
    /// and adds the rows' positions, as `cat([class, patches]) + positions`.
    #[test]
    fn patches_land_after_the_class_row_on_top_of_the_positions() {
        let (images, n, inp, d) = (3, 4, 6, 5);
        let (x, w, bias, first) = (
            values(images * n * inp, 7),
            values(d * inp, 8),
            values(d, 9),
            values((n + 1) * d, 10),
        );
        let mut out = first.repeat(images);
        Gemm::patches(images, n, inp, d, 1)
            .run(&w, &x, &mut out, Some(&bias))
            .unwrap();
        for p in 0..images {
            for r in 0..=n {
                for o in 0..d {
                    let mut want = first[r * d + o];
                    if r > 0 {
                        let row = p * n + r - 1;
                        want += bias[o]
                            + (0..inp)
                                .map(|i| x[row * inp + i] * w[o * inp + i])
                                .sum::<f32>();
                    }
                    let got = out[(p * (n + 1) + r) * d + o];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "image {p} row {r} col {o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn calls_that_would_reach_outside_their_buffers_are_refused() {
        let shape = Heads {
            b: 2,
            t: 3,
            heads: 2,
            dh: 4,
        };
        let qkv = shape.b * shape.t * 3 * shape.heads * shape.dh;
        let out = shape.b * shape.t * shape.heads * shape.dh;
        // The last head's scores end the scores; its values end qkv.
        let g = Gemm::scores(shape, false)[1];
        g.check(qkv, qkv, shape.scores_len()).unwrap();
        assert!(g.check(qkv, qkv, shape.scores_len() - 1).is_err());
        let g = Gemm::values(shape)[1];
        g.check(qkv, shape.scores_len(), out).unwrap();
        assert!(g.check(qkv - 1, shape.scores_len(), out).is_err());
        assert!(g.check(qkv, shape.scores_len() - 1, out).is_err());
        assert!(g.check(qkv, shape.scores_len(), out - 1).is_err());
        let mut bad = Gemm::linear(4, 3, 2, false);
        bad.lda = 2;
        let err = bad.check(6, 12, 8).unwrap_err().to_string();
        assert!(err.contains("leading dimension"), "{err}");
        assert!(Heads::of((2, 3, 10), 2).is_err());
        assert_eq!(Heads::of((2, 3, 24), 2).unwrap().dh, 4);
    }
}
