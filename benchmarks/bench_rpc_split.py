"""Split decoding over rpc-servers against the CPU alone: recorded runs replayed by the GGUF
engine with the memory's layers on the CPU and one or two ``rpc-server``s on 127.0.0.1.

Run: python benchmarks/bench_rpc_split.py [REPEATS]   (prints a table, writes
results/bench_rpc_split.json). Needs the RPC ggml of ``bash .ci/ggml_rpc build-rpc``.
Each repeat is one tests/rpc_worker.py process (``split1`` / ``split2``): per run, the
whole replay (every step: decodes, sequence ops, state writes and restores) over a
CPU-only memory, then over the split one, weights on the CPU. The ratio of those two
times is taken per repeat; the table shows medians. Loopback: the round trips cost
little, so this mostly measures the scheduler's copies and the per-call overhead.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _util import print_table, write_results

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build-rpc"


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    if not (BUILD / "bin" / "rpc-server").exists():
        sys.exit(f"no RPC ggml at {BUILD}: run bash .ci/ggml_rpc build-rpc")
    env = dict(os.environ, PYMEM_GGML_LIB_DIR=str(BUILD / "lib"))
    samples: dict[str, dict[str, list[float]]] = {}
    for mode in ("split1", "split2"):
        for _ in range(repeats):
            proc = subprocess.run(
                [sys.executable, str(ROOT / "tests" / "rpc_worker.py"),
                 str(BUILD / "bin" / "rpc-server"), mode],
                env=env, capture_output=True, text=True, timeout=300, check=True,
            )  # fmt: skip
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            for name, got in out["runs"].items():
                if got["weights"] != "CPU":
                    continue
                s = samples.setdefault(f"{name} {mode}", {"cpu": [], "split": [], "ratio": []})
                s["cpu"].append(got["t_cpu_s"])
                s["split"].append(got["t_split_s"])
                s["ratio"].append(got["t_split_s"] / got["t_cpu_s"])
    rows: list[list[object]] = []
    data: dict[str, dict[str, float]] = {}
    for key, s in samples.items():
        med = {k: statistics.median(v) for k, v in s.items()}
        data[key] = med
        rows.append([key, f"{med['cpu'] * 1e3:.0f} ms", f"{med['split'] * 1e3:.0f} ms",
                     f"{med['ratio']:.2f}"])  # fmt: skip
    print_table(
        f"recorded replays, split over CPU + rpc-servers vs CPU alone (median of {repeats})",
        ["run, servers", "CPU alone", "split", "split / CPU"],
        rows,
    )
    print(f"\nwrote {write_results('bench_rpc_split', {'repeats': repeats, 'runs': data})}")


if __name__ == "__main__":
    main()
