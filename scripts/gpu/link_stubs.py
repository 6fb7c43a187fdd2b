#!/usr/bin/env python3
"""Link-time stand-ins for the CUDA libraries, so a `--features cuda` binary
links on a machine without a GPU driver or the CUDA math libraries.

candle enables cudarc with `dynamic-linking`: the binary is linked with
`-lcuda -lnvrtc -lcurand -lcublas -lcublasLt`. No PyPI wheel ships the
driver library (`libcuda.so` comes with the driver), and the cuBLAS wheel is
about 600 MB for a library that is only needed to *link* here: at run time,
on the GPU machine, the real libraries are found by their sonames through
`LD_LIBRARY_PATH` (the driver's `libcuda.so.1`, the `nvidia-*` wheels' libs).

So each stand-in is a shared object with the real library's soname that
defines every function cudarc declares for it (names read from cudarc's own
bindings, so they follow the pinned cudarc version). The linker records the
soname as a dependency and checks that every symbol the program uses is
defined somewhere; the stubs are never loaded at run time. This is the same
idea as the toolkit's own `lib/stubs/libcuda.so`, which no wheel carries.

    python3 scripts/gpu/link_stubs.py CUDARC_SRC_DIR OUT_DIR

writes OUT_DIR/lib/stubs/lib*.so{,.N}; cudarc's build script searches
`$CUDA_TOOLKIT_ROOT_DIR/lib/stubs` (any of its CUDA path variables).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# cudarc module -> (soname of the CUDA 13 library, name the linker asks for)
LIBRARIES = {
    "driver": ("libcuda.so.1", "libcuda.so"),
    "nvrtc": ("libnvrtc.so.13", "libnvrtc.so"),
    "curand": ("libcurand.so.10", "libcurand.so"),
    "cublas": ("libcublas.so.13", "libcublas.so"),
    "cublaslt": ("libcublasLt.so.13", "libcublasLt.so"),
}

# In cudarc's generated bindings every function body holds, for the linked
# (not dynamically loaded) build, `extern "C" { fn NAME(...`.
EXTERN_FN = re.compile(r'extern "C" \{\s*fn (\w+)\(')


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = Path(sys.argv[1]), Path(sys.argv[2]) / "lib" / "stubs"
    out.mkdir(parents=True, exist_ok=True)
    for module, (soname, linkname) in LIBRARIES.items():
        bindings = src / "src" / module / "sys" / "mod.rs"
        names = sorted(set(EXTERN_FN.findall(bindings.read_text())))
        if not names:
            print(f"no functions found in {bindings}", file=sys.stderr)
            return 1
        c_file = out / f"{module}.c"
        # The signatures do not matter to the linker: only the names.
        c_file.write_text("".join(f"void {n}(void) {{}}\n" for n in names))
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-o", str(out / soname), f"-Wl,-soname,{soname}", str(c_file)],
            check=True,
        )
        c_file.unlink()
        link = out / linkname
        link.unlink(missing_ok=True)
        link.symlink_to(soname)
        print(f"   {soname}: {len(names)} functions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
