"""Small timing helpers shared by the benchmark scripts (not tests: no timed assertions)."""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], object], repeat: int = 7, number: int | None = None) -> float:
    """Best time per call in seconds over ``repeat`` rounds of ``number`` calls (auto-sized)."""
    if number is None:
        number = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            if time.perf_counter() - t0 > 0.02 or number >= 1 << 16:
                break
            number *= 4
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        **data,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def copy_target(src: np.ndarray) -> np.ndarray:
    """An uninitialised uint8 array of ``src``'s size for the numpy-copy baseline, placed
    2 KiB past ``src`` modulo 4 KiB. glibc's memcpy (``rep movsb``) runs several times
    slower on this machine kind when the destination lies just past the source modulo
    4 KiB (a 360 KB copy: 122 µs at 16 bytes past, 13-17 µs elsewhere;
    ``bench_copy_offset.py``), and ``np.empty_like`` lands wherever the allocator puts it:
    a baseline there moved a ratio by up to 8x between runs. pymem's own copies avoid the
    window (``pm_copy_bytes``); the baseline is the copy at its usual speed."""
    n = src.size
    base = np.empty(n + 8192, np.uint8)
    at = (src.ctypes.data + 2048 - base.ctypes.data) % 4096
    return base[at : at + n]


EVICT_BYTES = 16 << 20  # four times the development machine's 4 MiB L2
_evict_src: np.ndarray | None = None
_evict_dst: np.ndarray | None = None


def evict() -> None:
    """Leave L1/L2 holding nothing a measured call uses, as a decode step between two
    calls does (it streams weights and other sequences' K/V): a 16 MiB copy, not timed."""
    global _evict_src, _evict_dst
    if _evict_src is None:
        _evict_src = np.ones(EVICT_BYTES, np.uint8)
        _evict_dst = np.empty_like(_evict_src)
    np.copyto(_evict_dst, _evict_src)  # type: ignore[arg-type]


def cold_each(fns: dict[str, Any], repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each function, each call timed right after :func:`evict`, in a
    shuffled order per round: every function starts from the same cache state (an
    interleaved timing lets each call inherit what the call before it left; a destination
    buffer still in L2 or just evicted dirty moves a 2 MiB copy by 30% or more)."""
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for n in names:
            evict()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(v)) for n, v in times.items()}


def threads_label() -> str:
    """pymem's state-copy threads, as the tables say it: E.g. "2 threads from 1 MiB"."""
    from pymem import state_threads

    n, min_bytes = state_threads()
    return f"{n} thread{'s' if n != 1 else ''} from {min_bytes / 2**20:g} MiB"


def finish_run(
    name: str, quick: bool, load_before: tuple[float, float, float], **results: Any
) -> None:
    """The load averages and, for a full run, results/NAME.json with ``results`` and what
    the machine and pymem ran with (CPUs, pymem's state-copy threads)."""
    import os

    from pymem import state_threads

    load_after = os.getloadavg()
    print(
        f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"{os.cpu_count()} CPUs; pymem state copies on {threads_label()}"
    )
    if not quick:
        path = write_results(name, dict(**results, load_average_before=load_before,
                                        load_average_after=load_after, cpus=os.cpu_count(),
                                        state_threads=state_threads()))  # fmt: skip
        print(f"wrote {path}")
