"""Generate the cffi API-mode C source for pymem's extension (run by CMake at build time).

Usage: python gen_cffi.py <module name> <out.c> <cdef file or header>...

A header (``.h`` holding a ``PYMEM_CDEF_BEGIN`` ... ``PYMEM_CDEF_END`` block) contributes
only that block, so pymem's own C API is declared once, in csrc/pymem_native.h.
"""

import os
import sys

import cffi


def cdef_block(text: str) -> str:
    """The text between the PYMEM_CDEF_BEGIN / PYMEM_CDEF_END marker lines, or all of it."""
    if "PYMEM_CDEF_BEGIN" not in text:
        return text
    lines = text.splitlines()
    begin = next(i for i, line in enumerate(lines) if "PYMEM_CDEF_BEGIN" in line)
    end = next(i for i in range(begin + 1, len(lines)) if lines[i].strip() == "// PYMEM_CDEF_END")
    return "\n".join(lines[begin + 1 : end])


def main() -> None:
    module, out, *cdefs = sys.argv[1:]
    ffi = cffi.FFI()
    for path in cdefs:
        with open(path, encoding="utf-8") as f:
            ffi.cdef(cdef_block(f.read()))
    prelude = '#include "ggml.h"\n#include "ggml-alloc.h"\n#include "ggml-backend.h"\n'
    # pymem's own headers (csrc/pymem_*.h), each included once
    prelude += "".join(
        f'#include "{os.path.basename(p)}"\n'
        for p in cdefs
        if os.path.basename(p).startswith("pymem_")
    )
    ffi.set_source(module, prelude, py_limited_api=True)
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main()
