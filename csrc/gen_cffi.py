"""Generate the cffi API-mode C source for pymem's extension (run by CMake at build time).

Usage: python gen_cffi.py <module name> <out.c> <cdef file>...
"""

import sys

import cffi


def main() -> None:
    module, out, *cdefs = sys.argv[1:]
    ffi = cffi.FFI()
    for path in cdefs:
        with open(path, encoding="utf-8") as f:
            ffi.cdef(f.read())
    prelude = '#include "ggml.h"\n#include "ggml-alloc.h"\n#include "ggml-backend.h"\n#include "pymem_native.h"\n'
    ffi.set_source(module, prelude, py_limited_api=True)
    ffi.emit_c_code(out)


if __name__ == "__main__":
    main()
