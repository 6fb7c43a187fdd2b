// Attention in one kernel for short sequences (src/attention.rs): a block
// per (sequence, head) reads that head's queries, keys and values from the
// packed projections `qkv [b, t, 3d]` (queries already scaled), keeps the
// scores in shared memory in f32, takes the softmax (the additive mask
// added as the scores are read), multiplies by the values and writes the
// head's columns of the merged output `out [b, t, d]`.
//
// Why our own: the GEMM path launches two cuBLAS calls per head and layer
// (24 for ViT-B/32's 12 heads), each a few microseconds of tiny matrices,
// with the scores written to and read back from global memory twice in
// between; PyTorch's SDPA does a layer's attention in one kernel. Here the
// scores never leave the SM: one read of q, k and v, one write of the
// output. CLIP's towers have head dim 64 and at most 77 tokens (ViT-B/32:
// 50), so a sequence's whole head fits one block: no online softmax, no
// tiling over the keys.
//
// The products run on tensor cores (WMMA, 16x16x16 tiles, f32
// accumulators): f16 needs sm_70, bf16 sm_80, and the bf16 entry points
// exist only when compiled for sm_80 or newer (the Rust side then takes the
// GEMM path). The scores stay f32 until the probabilities, which are
// rounded to the storage type once, as the tensor cores take them (what
// flash attention does too); the output is rounded once.
//
// Shapes: `TP` is the sequence length padded to a multiple of 16 (the
// tiles'), `TP / 16` warps to a block, warp `w` owning query rows `16w ..
// 16w + 15`. Keys and values past `t` are zeros in shared memory and the
// scores of those columns are skipped, so padding never reaches a result.
// Shared memory: keys and values (`2 · TP · 64` values) and a strip per
// warp that holds in turn the warp's queries, its scores (f32), its
// probabilities and its output rows (f32): 47,360 bytes at `TP = 80`, under
// the 48 KiB a block gets without opting in.

#include <mma.h>
#include <stdint.h>

#include "convert.cuh"

namespace {

using mmembed::load;
using mmembed::store;
using namespace nvcuda;

constexpr int kWarp = 32;
constexpr int kTile = 16;
// Head dim: every CLIP tower's (and SigLIP's, Chinese-CLIP's).
constexpr int kDh = 64;

template <int TP>
struct Strip {
    // Row strides, padded so that a warp's lanes reading a column of rows
    // hit different banks: f32 scores, 16-bit probabilities (WMMA wants a
    // multiple of 8 elements), f32 output rows.
    static constexpr int kScores = TP + 4;
    static constexpr int kProbs = TP + 8;
    static constexpr int kOut = kDh + 4;
    // Floats per warp: the largest of what the strip holds in turn (the
    // probabilities, 16-bit, take at most half of the scores' bytes... and
    // are written over them row by row, see below).
    static constexpr int kFloats = kTile * (kScores > kOut ? kScores : kOut);
};

template <typename T, int TP, bool MASKED>
__device__ void attention_block(const T* __restrict__ qkv, const T* __restrict__ mask,
                                T* __restrict__ out, int t, int heads, int mask_blocks) {
    constexpr int kWarps = TP / kTile;
    constexpr int kChunk = 8;  // 16-bit values in 16 bytes
    __shared__ __align__(128) T keys[TP * kDh];
    __shared__ __align__(128) T values[TP * kDh];
    __shared__ __align__(128) float strips[kWarps * Strip<TP>::kFloats];

    const int seq = blockIdx.x / heads;
    const int head = blockIdx.x % heads;
    const int d = heads * kDh;
    const int64_t stride = 3 * static_cast<int64_t>(d);
    const T* base = qkv + static_cast<int64_t>(seq) * t * stride + head * kDh;

    // Each thread copies 16-byte chunks: queries into their warp's strip
    // (row stride kDh), keys and values into theirs; zeros past `t`.
    for (int i = threadIdx.x; i < TP * (kDh / kChunk); i += blockDim.x) {
        const int r = i / (kDh / kChunk);
        const int c = (i % (kDh / kChunk)) * kChunk;
        uint4 q = make_uint4(0, 0, 0, 0), k = q, v = q;
        if (r < t) {
            const T* row = base + r * stride + c;
            q = *reinterpret_cast<const uint4*>(row);
            k = *reinterpret_cast<const uint4*>(row + d);
            v = *reinterpret_cast<const uint4*>(row + 2 * d);
        }
        T* qs = reinterpret_cast<T*>(strips + (r / kTile) * Strip<TP>::kFloats);
        *reinterpret_cast<uint4*>(qs + (r % kTile) * kDh + c) = q;
        *reinterpret_cast<uint4*>(keys + r * kDh + c) = k;
        *reinterpret_cast<uint4*>(values + r * kDh + c) = v;
    }
    __syncthreads();

    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    float* strip = strips + warp * Strip<TP>::kFloats;
    T* probs = reinterpret_cast<T*>(strip);

    // Scores: the warp's 16 queries against every key, S = Q Kᵀ. Kᵀ is the
    // keys read column-major.
    {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> q[kDh / kTile];
#pragma unroll
        for (int kk = 0; kk < kDh / kTile; ++kk)
            wmma::load_matrix_sync(q[kk], reinterpret_cast<const T*>(strip) + kk * kTile, kDh);
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> s[TP / kTile];
#pragma unroll
        for (int j = 0; j < TP / kTile; ++j) {
            wmma::fill_fragment(s[j], 0.f);
#pragma unroll
            for (int kk = 0; kk < kDh / kTile; ++kk) {
                wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> k;
                wmma::load_matrix_sync(k, keys + j * kTile * kDh + kk * kTile, kDh);
                wmma::mma_sync(s[j], q[kk], k, s[j]);
            }
        }
        // The queries are in registers now: the scores go over them.
        __syncwarp();
#pragma unroll
        for (int j = 0; j < TP / kTile; ++j)
            wmma::store_matrix_sync(strip + j * kTile, s[j], Strip<TP>::kScores,
                                    wmma::mem_row_major);
        __syncwarp();
    }

    // Softmax over each row of scores: two lanes to a row, taking
    // alternate columns. A row's probabilities are written over the
    // scores' first rows, so every lane reads its row into registers
    // before any lane writes.
    {
        const int r = lane / 2, half = lane % 2, query = warp * kTile + r;
        const float* scores = strip + r * Strip<TP>::kScores;
        const T* m = nullptr;
        if (MASKED && query < t)
            m = mask + (static_cast<int64_t>(seq % mask_blocks) * t + query) * t;
        float v[TP / 2];
        float mx = -INFINITY;
#pragma unroll
        for (int i = 0; i < TP / 2; ++i) {
            const int c = 2 * i + half;
            float e = -INFINITY;
            if (c < t) {
                e = scores[c];
                if (MASKED && m) e += load(m[c]);
            }
            v[i] = e;
            mx = fmaxf(mx, e);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < TP / 2; ++i) {
            // A row whose every value is -inf gives NaN, as the unfused
            // ops (and our row softmax) do.
            v[i] = 2 * i + half < t ? expf(v[i] - mx) : 0.f;
            sum += v[i];
        }
        const float inv = 1.f / (sum + __shfl_xor_sync(0xffffffffu, sum, 1));
        __syncwarp();
        T* p = probs + r * Strip<TP>::kProbs;
        // Columns t .. TP-1 get zeros: the product below reads them.
#pragma unroll
        for (int i = 0; i < TP / 2; ++i) p[2 * i + half] = store<T>(v[i] * inv);
        __syncwarp();
    }

    // The warp's output rows, O = P V.
    {
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> o[kDh / kTile];
#pragma unroll
        for (int j = 0; j < kDh / kTile; ++j) wmma::fill_fragment(o[j], 0.f);
#pragma unroll
        for (int kk = 0; kk < TP / kTile; ++kk) {
            wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> p;
            wmma::load_matrix_sync(p, probs + kk * kTile, Strip<TP>::kProbs);
#pragma unroll
            for (int j = 0; j < kDh / kTile; ++j) {
                wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> v;
                wmma::load_matrix_sync(v, values + kk * kTile * kDh + j * kTile, kDh);
                wmma::mma_sync(o[j], p, v, o[j]);
            }
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < kDh / kTile; ++j)
            wmma::store_matrix_sync(strip + j * kTile, o[j], Strip<TP>::kOut, wmma::mem_row_major);
        __syncwarp();
    }

    // The rows that exist, rounded once, into this head's columns.
    for (int r = 0; r < kTile; ++r) {
        const int query = warp * kTile + r;
        if (query >= t) break;
        const float* o = strip + r * Strip<TP>::kOut;
        T* dst = out + (static_cast<int64_t>(seq) * t + query) * d + head * kDh;
        for (int c = 2 * lane; c < kDh; c += 2 * kWarp) {
            dst[c] = store<T>(o[c]);
            dst[c + 1] = store<T>(o[c + 1]);
        }
    }
}

}  // namespace

// Entry points `attention_<dtype>_<TP>` and `attention_masked_<dtype>_<TP>`
// for sequences of up to TP tokens; src/attention.rs picks the smallest TP
// that holds `t` (PADDED there lists them) and launches `b · heads` blocks
// of `2 · TP` threads.
#define ATTENTION_KERNELS(T, NAME, TP)                                                     \
    extern "C" __global__ void __launch_bounds__(2 * TP)                                   \
        attention_##NAME##_##TP(const T* qkv, T* out, int t, int heads) {                  \
        attention_block<T, TP, false>(qkv, nullptr, out, t, heads, 1);                     \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(2 * TP) attention_masked_##NAME##_##TP(   \
        const T* qkv, const T* mask, T* out, int t, int heads, int mask_blocks) {          \
        attention_block<T, TP, true>(qkv, mask, out, t, heads, mask_blocks);               \
    }

#define ATTENTION_LENGTHS(T, NAME) \
    ATTENTION_KERNELS(T, NAME, 16) \
    ATTENTION_KERNELS(T, NAME, 32) \
    ATTENTION_KERNELS(T, NAME, 48) \
    ATTENTION_KERNELS(T, NAME, 64) \
    ATTENTION_KERNELS(T, NAME, 80)

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
ATTENTION_LENGTHS(__half, f16)
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
ATTENTION_LENGTHS(__nv_bfloat16, bf16)
#endif
