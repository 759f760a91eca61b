"""Native tensor I/O against a plain numpy copy of the same bytes.

Run: python benchmarks/bench_backend.py   (prints a table, writes results/bench_backend.json)
"""

from __future__ import annotations

import numpy as np
from _util import best_of, print_table, write_results

import pymem
from pymem.backend import TensorSpec, TensorStore


def main() -> None:
    rng = np.random.default_rng(0)
    rows: list[list[object]] = []
    data: dict[str, dict[str, float]] = {}
    with TensorStore(
        "CPU", [TensorSpec("k", "f16", (512, 8192)), TensorSpec("big", "f32", (4096, 4096))]
    ) as store:
        k, big = store["k"], store["big"]  # k rows are 1 KiB; big is 64 MiB
        # 512 scattered rows of 1 KiB, like a prefill's K rows landing in free cells
        idx = np.sort(rng.choice(k.n_rows, 512, replace=False)).astype(np.int64)
        src = rng.integers(0, 255, (512, k.row_size), dtype=np.uint8)
        host = np.zeros((k.n_rows, k.row_size), dtype=np.uint8)
        t_rows = best_of(lambda: k.write_rows(idx, src))
        t_np_rows = best_of(lambda: host.__setitem__(idx, src))
        t_read_rows = best_of(lambda: k.read_rows(idx))
        rows.append(
            [
                "write_rows 512 x 1 KiB (scattered)",
                f"{t_rows * 1e6:.1f} us",
                f"{t_np_rows * 1e6:.1f} us",
                f"{t_np_rows / t_rows:.2f}",
            ]
        )
        rows.append(
            [
                "read_rows 512 x 1 KiB (scattered)",
                f"{t_read_rows * 1e6:.1f} us",
                f"{t_np_rows * 1e6:.1f} us",
                f"{t_np_rows / t_read_rows:.2f}",
            ]
        )
        data["write_rows_512x1KiB"] = {"pymem_s": t_rows, "numpy_s": t_np_rows}
        data["read_rows_512x1KiB"] = {"pymem_s": t_read_rows, "numpy_s": t_np_rows}

        out = bytearray(big.nbytes)
        src_big = np.frombuffer(rng.bytes(big.nbytes), dtype=np.uint8)
        dst_big = np.empty_like(src_big)
        big.write_bytes(src_big)
        t_read = best_of(lambda: big.read_into(out), repeat=5)
        t_np = best_of(lambda: np.copyto(dst_big, src_big), repeat=5)
        gbs = big.nbytes / t_read / 1e9
        rows.append(
            [
                "read 64 MiB tensor",
                f"{t_read * 1e3:.2f} ms ({gbs:.1f} GB/s)",
                f"{t_np * 1e3:.2f} ms ({big.nbytes / t_np / 1e9:.1f} GB/s)",
                f"{t_np / t_read:.2f}",
            ]
        )
        data["read_64MiB"] = {"pymem_s": t_read, "numpy_s": t_np}

        t_alloc = best_of(lambda: TensorStore("CPU", [TensorSpec("x", "f16", (128, 4096))]).close())
        rows.append(["TensorStore 1 MiB create + close", f"{t_alloc * 1e6:.1f} us", "-", "-"])
        data["store_create_close_1MiB"] = {"pymem_s": t_alloc}

    print_table(
        f"pymem native I/O on {pymem.ggml_info().version} CPU (ratio = numpy time / pymem time)",
        ["operation", "pymem", "numpy copy", "ratio"],
        rows,
    )
    print(f"\nwrote {write_results('bench_backend', data)}")


if __name__ == "__main__":
    main()
