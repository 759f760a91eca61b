"""A regression guard: pymem's hot paths timed against another commit's build, side by side.

    python benchmarks/bench_guard.py                      # this checkout alone
    python benchmarks/bench_guard.py --against 223476e    # and that commit, interleaved

One run of the guard times a fixed set of cases on the tiny GGUF models (pymem only, no
llama.cpp: about half a minute):

- decode steps: 32 sequences x 1 token after 64-token prompts, n_ctx 32,768, flash
  attention off, unified and one stream per sequence, each model; tiny-llama unified with
  one prompt forked to every sequence. Every step starts with 32 MiB touched (the caches
  evicted, as a model's compute leaves them), as a runtime meets it;
- state I/O on a unified memory of 4 sequences x 2,048 tokens (n_seq_max 8): the whole
  blob written into a buffer, read back, read into a cleared memory; one sequence written,
  read, swapped in (seq_rm then read); and the same whole blob after ``seq_cp(1, 5)``
  (cells shared by two sequences);
- sequence ops on that memory: a fork made and removed (seq_cp + seq_rm), 1,000
  ``seq_pos_max`` calls.

``--against REF`` builds commit REF in a git worktree (``build/guard/REF``, kept for the
next run), then runs the guard ``--rounds`` times for each build in turn, in fresh
processes (one ggml per process), and prints each case's median microseconds on both
sides with their ratio; a case more than ``--slower`` (default 1.15) times REF's is
marked SLOWER, one faster than 1 / 1.15 times, faster. The cases use the public API
only, so older builds run them too. Results go to ``results/bench_guard.json`` (alone) or
``results/bench_guard_vs_REF.json``. A report, not a test: ``--strict`` makes a SLOWER
row exit 1 for whoever wants to gate on it on a quiet machine.

This guard exists because a change to the whole-blob writer for forked caches (473e2fd)
doubled the composites' whole write without a fork (gemma2 21 -> 41 us, jamba 28 -> 45 us),
and nothing compared the other rows before and after until two sessions later.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "llama": ROOT / "tests/data/models/tiny-llama.gguf",
    "jamba": ROOT / "tests/data/models/tiny-jamba.gguf",
    "gemma2": ROOT / "tests/data/models/tiny-gemma2.gguf",
}
N_CTX = 32768
PROMPT = 64
N_SEQ_STEP = 32
STATE_TOKENS = 2048
STATE_SEQS = 4
STATE_SEQ_MAX = 8
EVICT = np.ones(8 << 20, dtype=np.float32)  # 32 MiB


def _memory(name: str, n_seq_max: int, unified: bool, flash_attn: bool = False) -> Any:
    from pymem.factory import ContextParams, create_memory
    from pymem.gguf_spec import spec_from_gguf

    params = ContextParams(n_ctx=N_CTX, n_seq_max=n_seq_max, n_ubatch=512, n_batch=2048,
                           kv_unified=unified, flash_attn=flash_attn, swa_full=False,
                           type_k="f16", type_v="f16")  # fmt: skip
    mem = create_memory(spec_from_gguf(str(MODELS[name])), params)
    if mem is None:
        raise RuntimeError(f"no memory for {name}")
    return mem


class Decoder:
    """Everything pymem does for one decode call but the graph (as a runtime drives it)."""

    def __init__(self, mem: Any, n_seq_max: int, flash_attn: bool) -> None:
        from pymem.batch import BatchAllocator

        self.mem, self.n_seq_max = mem, n_seq_max
        self.balloc = BatchAllocator()
        self.mask_dtype = np.float16 if flash_attn else np.float32

    def decode(
        self, seq: np.ndarray, pos: np.ndarray, out: np.ndarray, inputs: bool = True
    ) -> None:
        from pymem.batch import Batch
        from pymem.memory import MemoryStatus

        batch = Batch((pos % 100).astype(np.int32), pos=pos.astype(np.int32),
                      seq_id=seq.astype(np.int32), output=out.astype(np.bool_))  # fmt: skip
        self.balloc.init(batch, memory=self.mem, n_seq_max=self.n_seq_max, n_vocab=100)
        upd = self.mem.init_update(False)
        if upd.get_status() == MemoryStatus.SUCCESS:
            upd.apply()
        mctx = self.mem.init_batch(self.balloc, 512, False)
        if mctx.get_status() != MemoryStatus.SUCCESS:
            raise RuntimeError(f"init_batch: {mctx.get_status().name}")
        while True:
            mctx.apply()
            if inputs:
                gi = mctx.graph_inputs()
                for inp in gi.attn.values():
                    inp.kq_mask(dtype=self.mask_dtype)
                    inp.k_idxs, inp.v_idxs  # noqa: B018 (read as a runtime does)
                if gi.recr is not None:
                    gi.recr.s_copy  # noqa: B018
            if not mctx.next():
                break


def _median_us(fn: Callable[[], object], repeats: int, evict: bool = False) -> float:
    times = []
    for _ in range(repeats):
        if evict:
            EVICT.sum()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def decode_cases(cases: dict[str, float], steps: int) -> None:
    configs = [(m, u, False) for m in MODELS for u in (True, False)] + [("llama", True, True)]
    for name, unified, fork in configs:
        label = f"decode {name} {'unified' if unified else 'streams'}{' forked' if fork else ''}"
        cases[label] = _decode_one(name, unified, fork, steps)


def _decode_one(name: str, unified: bool, fork: bool, steps: int) -> float:
    """Median microseconds of one decode step (caches evicted first) of ``N_SEQ_STEP``
    sequences after their prompts (``fork``: one prompt copied to every sequence)."""
    mem = _memory(name, N_SEQ_STEP, unified)
    dec = Decoder(mem, N_SEQ_STEP, False)
    prompts = [0] if fork else list(range(N_SEQ_STEP))
    for s0 in range(0, len(prompts), 8):
        seqs = prompts[s0 : s0 + 8]
        seq = np.repeat(seqs, PROMPT)
        pos = np.tile(np.arange(PROMPT), len(seqs))
        dec.decode(seq, pos, pos == PROMPT - 1)
    if fork:
        for q in range(1, N_SEQ_STEP):
            mem.seq_cp(0, q, -1, -1)
    at = [PROMPT]
    every = np.arange(N_SEQ_STEP)
    out = np.ones(N_SEQ_STEP, dtype=np.bool_)

    def step() -> None:
        dec.decode(every, np.full(N_SEQ_STEP, at[0]), out)
        at[0] += 1

    for _ in range(20):
        step()
    us = _median_us(step, steps, evict=True)
    mem.close()
    return us


def state_cases(cases: dict[str, float], repeats: int) -> None:
    for name, fa in (("llama", False), ("llama", True), ("jamba", False), ("gemma2", False)):
        _state_one(cases, name, fa, repeats)


def _state_one(cases: dict[str, float], name: str, fa: bool, repeats: int) -> None:
    """The state and op cases of one model (``fa``: V in rows) into ``cases``."""
    mem = _memory(name, STATE_SEQ_MAX, True, fa)
    dec = Decoder(mem, STATE_SEQ_MAX, fa)
    for p0 in range(0, STATE_TOKENS, 128):
        seq = np.repeat(np.arange(STATE_SEQS), 128)
        pos = np.tile(np.arange(p0, p0 + 128), STATE_SEQS)
        dec.decode(seq, pos, pos == p0 + 127, inputs=False)
    rng = np.random.default_rng(0)
    for part in mem.parts().values():
        for t in _tensors(part):
            t.write_bytes(rng.integers(0, 255, t.nbytes, np.uint8))
    tag = f"{name}{' fa' if fa else ''}"
    _state_blobs(cases, mem, f"state {tag}", repeats, whole_only=False)
    mem.seq_cp(1, 5, -1, -1)  # cells shared by two sequences: whole records of two ids
    _state_blobs(cases, mem, f"state {tag} forked", repeats, whole_only=True)
    mem.seq_rm(5, -1, -1)
    if not fa:
        cases[f"ops {tag} fork + remove"] = _median_us(
            lambda: (mem.seq_cp(2, 6, -1, -1), mem.seq_rm(6, -1, -1)), repeats
        )
        cases[f"ops {tag} seq_pos_max x1000"] = _median_us(
            lambda: [mem.seq_pos_max(s & 3) for s in range(1000)], max(5, repeats // 4)
        )
    mem.close()


def _state_blobs(
    cases: dict[str, float], mem: Any, what: str, repeats: int, whole_only: bool
) -> None:
    """The whole blob and sequence 0's written, read, read cleared or swapped in."""
    whole = bytes(mem.state_write())
    seq0 = bytes(mem.state_write(0))
    wbuf, sbuf = bytearray(len(whole)), bytearray(len(seq0))
    fns: dict[str, Callable[[], object]] = {
        f"{what} whole write": lambda: mem.state_write_buffer(wbuf),
        f"{what} whole read": lambda: mem.state_read(whole),
        f"{what} whole read cleared": lambda: (mem.clear(False), mem.state_read(whole)),
        f"{what} seq write": lambda: mem.state_write_buffer(sbuf, 0),
        f"{what} seq read": lambda: mem.state_read(seq0, 0),
        f"{what} seq swap-in": lambda: (mem.seq_rm(0, -1, -1), mem.state_read(seq0, 0)),
    }
    for label, fn in fns.items():
        if whole_only and "whole" not in label:
            continue
        cases[label] = _median_us(fn, repeats)
        mem.state_read(whole)  # (a window's swap-in may keep fewer cells)


def _tensors(part: Any) -> list[Any]:
    layers = getattr(part, "layers", [])
    out = []
    for layer in layers:
        if hasattr(layer, "k"):
            out += [t for t in (layer.k, layer.v) if t is not None]
        else:
            out += [part.get_r_l(layer), part.get_s_l(layer)]
    return out


def run_cases(quick: bool) -> dict[str, float]:
    cases: dict[str, float] = {}
    decode_cases(cases, 40 if quick else 120)
    state_cases(cases, 9 if quick else 31)
    return cases


def build(ref: str) -> Path:
    """Commit ``ref`` checked out and built in ``build/guard/<sha>`` (kept)."""
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    tree = ROOT / "build" / "guard" / sha
    lib = tree / "pymem" / "_pymem_cffi.abi3.so"
    if lib.exists():
        return tree
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), sha], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
    print(f"building {ref} ({sha}) in {tree} ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tree / "build" / "wheel"), str(tree),
                    f"--config-settings=build-dir={tree / 'build' / 'native'}"],
                   check=True)  # fmt: skip
    built = next((tree / "build" / "native").glob("_pymem_cffi*.so"))
    lib.write_bytes(built.read_bytes())
    return tree


def child(tree: Path | None, quick: bool) -> dict[str, float]:
    """The cases timed in a fresh process on the pymem of ``tree`` (None: this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree if tree is not None else ROOT)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child"] + (
        ["--quick"] if quick else []
    )
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"the guard's run on {tree or ROOT} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_runs(
    old_runs: list[dict[str, float]], new_runs: list[dict[str, float]], slower_at: float
) -> tuple[list[list[str]], dict[str, Any], list[str]]:
    """Each case both builds timed: the medians over runs, ``now / then`` and its mark
    (SLOWER above ``slower_at``, faster below its inverse), as (table rows, JSON result,
    the SLOWER cases). A case only one build has is left out. E.g. then [10, 12, 11],
    now [13, 14, 12], slower_at 1.15 -> 11 -> 13, 1.18, SLOWER."""
    rows, slower = [], []
    result: dict[str, Any] = {}
    for k in new_runs[0]:
        if k not in old_runs[0]:
            continue
        old = statistics.median(run[k] for run in old_runs)
        new = statistics.median(run[k] for run in new_runs)
        ratio = new / old
        mark = "SLOWER" if ratio > slower_at else ("faster" if ratio < 1 / slower_at else "")
        if mark == "SLOWER":
            slower.append(k)
        rows.append([k, f"{old:.1f}", f"{new:.1f}", f"{ratio:.2f}", mark])
        result[k] = {"against_us": old, "now_us": new, "ratio": ratio}
    return rows, result, slower


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", metavar="REF", help="a git commit to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="runs per build (default 3)")
    ap.add_argument("--slower", type=float, default=1.15, help="ratio marked SLOWER")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a case is SLOWER")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_cases(args.quick)))
        return
    from _util import print_table, write_results

    if not args.against:
        runs = [child(None, args.quick) for _ in range(args.rounds)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print_table("pymem hot paths (median us)", ["case", "us"],
                    [[k, f"{v:.1f}"] for k, v in med.items()])  # fmt: skip
        print(f"wrote {write_results('bench_guard', {'cases_us': med})}")
        return
    old_tree = build(args.against)
    old_runs, new_runs = [], []
    for r in range(args.rounds):
        print(f"round {r + 1} / {args.rounds}", flush=True)
        old_runs.append(child(old_tree, args.quick))
        new_runs.append(child(None, args.quick))
    rows, result, slower = compare_runs(old_runs, new_runs, args.slower)
    print_table(f"pymem hot paths: this checkout against {args.against} (median us of "
                f"{args.rounds} interleaved runs each)",
                ["case", args.against, "now", "now / then", ""], rows)  # fmt: skip
    path = write_results(
        f"bench_guard_vs_{args.against}", {"against": args.against, "cases": result}
    )
    print(f"wrote {path}; {len(slower)} case(s) SLOWER than {args.slower}x")
    if args.strict and slower:
        sys.exit(1)


if __name__ == "__main__":
    main()
