#!/usr/bin/env python3
"""Groups a `perf report` symbol profile into op types.

    perf record -e cpu-clock -F 499 -o perf.data \
        target/release/examples/clip_loop /tmp/vit-b-32 images 32 20
    perf report -i perf.data --no-children --sort symbol --stdio | \
        python3 scripts/perf_by_op.py

Prints the share of samples per op type (matmul, activation, softmax, ...).
The patterns match the symbols of candle 0.11, the gemm crate and our own
kernels; anything unmatched is listed under "other" so nothing is hidden.
"""

import re
import sys

CATEGORIES = [
    ("matmul (f32 gemm kernel)", r"gemm_f32::microkernel|gemm_common::gemm|gemm::gemm"),
    ("matmul packing", r"gemm_common::(simd|pack)|V3::vectorize"),
    ("matmul (packed f32 kernel)", r"packed::avx512::tile|packed::avx2::tile|packed::dot_generic"),
    ("matmul (int8 kernel)", r"int8::avx2::tile|int8::dot_generic"),
    ("matmul (8-bit activation kernel)", r"w8a8::vnni::tile|w8a8::dot_generic"),
    ("activation quantisation (int8)", r"int8::quantize_row|w8a8::quantize|w8a8::row_stats|quantize_tile"),
    ("activation packing (rows into tiles)", r"rows_of_tile|pack_rows"),
    ("activation (GELU)", r"quick_gelu|gelu|unary_map|expf|exp_approx|__expf|sigmoid"),
    ("softmax", r"softmax"),
    ("layer norm", r"layer_norm|layernorm|LayerNorm"),
    ("copies (contiguous, transpose, cat)", r"copy_strided|copy2d|memmove|memcpy|index_select|Tensor::cat"),
    ("elementwise adds/muls", r"binary_map|Map2::map|vs_add|vd_add|broadcast|affine"),
    ("allocation, zeroing, page faults", r"memset|clear_page|page_fault|alloc|malloc|free|do_anonymous|mm_fault|charge|folio|lruvec|pte|unmap|munmap|mmap|madvise|brk"),
    ("thread pool / scheduling", r"rayon|crossbeam|BarrierGuard|sched|futex|yield|spin|switch|wake|idle|do_syscall"),
    # Closures inlined into a pool thread's entry point, so perf cannot name
    # them: with candle's own ops, its softmax, layer norm and conv2d loops.
    ("inlined into pool threads (candle softmax, layer norm, conv)", r"__rust_begin_short_backtrace"),
    ("model loading (quantising weights, reading)", r"QLinear::new|roundf|read|SafetensorsFiles"),
]


def main() -> None:
    totals: dict[str, float] = {}
    other: dict[str, float] = {}
    line_re = re.compile(r"^\s*([\d.]+)%\s+\[[.k]\]\s+(.*?)\s*$")
    for line in sys.stdin:
        m = line_re.match(line)
        if not m:
            continue
        share, symbol = float(m.group(1)), m.group(2)
        for name, pattern in CATEGORIES:
            if re.search(pattern, symbol):
                totals[name] = totals.get(name, 0.0) + share
                break
        else:
            other[symbol] = other.get(symbol, 0.0) + share
    for name, _ in CATEGORIES:
        if totals.get(name, 0.0) >= 0.05:
            print(f"{totals[name]:6.1f} %  {name}")
    rest = sum(other.values())
    print(f"{rest:6.1f} %  other")
    for symbol, share in sorted(other.items(), key=lambda kv: -kv[1])[:5]:
        if share >= 0.3:
            print(f"         {share:5.1f} %  {symbol[:100]}")


if __name__ == "__main__":
    main()
