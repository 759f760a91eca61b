"""pymem and llama-cpp-python in one process, in both import orders, share one ggml.

Pins the one-ggml-per-process trap (reference/packaging.md): an extension linked to a
second ggml under the same sonames breaks ``import llama_cpp`` or silently runs on the
wrong copy. Each order runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest

llama_cpp_spec = pytest.importorskip(
    "llama_cpp", reason="install the coexist extra: pip install '.[coexist]'"
)

PROBE = r"""
import json, os, sys
order = sys.argv[1]
if order == "llama_cpp_first":
    import llama_cpp
    import pymem
else:
    import pymem
    info0 = pymem.ggml_info()
    import llama_cpp
info = pymem.ggml_info()
llama_cpp.llama_backend_init()
store = pymem.TensorStore("CPU", [pymem.TensorSpec("k", "f16", (64, 8))])
store["k"].fill_rows([1, 2], 7)
ok_rows = store["k"].read_rows([1])[0].tolist() == [7] * 128
mapped = sorted({line.rsplit(" ", 1)[-1].strip() for line in open("/proc/self/maps")
                 if os.path.basename(line.rsplit(" ", 1)[-1].strip()).startswith("libggml-base")})
print(json.dumps({"source": info.source, "path": info.path, "version": info.version,
                  "mapped": mapped, "ok_rows": ok_rows,
                  "system_info": llama_cpp.llama_print_system_info().decode()[:40]}))
"""


@pytest.mark.parametrize("order", ["llama_cpp_first", "pymem_first"])
def test_one_ggml_in_both_import_orders(order: str) -> None:
    # run outside the checkout, so `import pymem` finds the installed package, not ./pymem
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, order],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["mapped"]) == 1, f"more than one ggml mapped: {result['mapped']}"
    assert result["mapped"][0].startswith(result["path"])
    assert "llama_cpp" in result["path"]
    assert result["source"] == ("process" if order == "llama_cpp_first" else "llama_cpp")
    assert result["ok_rows"]
