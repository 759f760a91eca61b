"""Saving and loading a prefix cache with its memory (pymem.reuse.persist): size and time.

Setup: 16 sequences on one memory (one stream, n_ctx 4096), each holding its own
``--tokens``-token history (bookkeeping only: ubatches applied without a model, so the
cells hold zeros; sizes and times do not depend on the values), a checkpoint at the end
of each: 16 RAM entries. Models: tiny-jamba (hybrid), tiny-gemma2 (iSWA, ``swa_full``
off), tiny-lfm2-swa (hybrid-iSWA).

Columns: file bytes and the share of the memory state, the checkpoints and the token
index; ``save`` / ``load`` (:meth:`PrefixCache.save`, :meth:`PrefixCache.load`, best of
5, the file in the page cache) against a plain whole-memory container
(:func:`pymem.container.write_container` / :func:`load_container`) of the same memory:
the cost of the cache's part. ``plain state B`` is that container's size.

Run: python benchmarks/bench_prefix_persist.py [--tokens N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import best_of, print_table, write_results

import pymem
from pymem.batch import Batch, BatchAllocator
from pymem.container import load_container, model_fingerprint, write_container
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory, MemoryStatus
from pymem.reuse import CheckpointPolicy, PrefixCache, as_tokens

MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
PARAMS = {
    "tiny-jamba.gguf": dict(flash_attn=False),
    "tiny-gemma2.gguf": dict(flash_attn=True, swa_full=False),
    "tiny-lfm2-swa.gguf": dict(flash_attn=False, swa_full=False),
}
N_SEQ = 16


def _memory(model: str) -> Memory:
    kw = dict(n_ctx=4096, n_seq_max=N_SEQ, n_batch=256, n_ubatch=256, kv_unified=True)
    kw.update(PARAMS[model])
    mem = create_memory(pymem.spec_from_gguf(MODELS / model), ContextParams(**kw))
    assert mem is not None
    return mem


def _fill(mem: Memory, seq: int, toks: np.ndarray, p0: int, p1: int) -> None:
    b = Batch(toks[p0:p1], pos=np.arange(p0, p1, dtype=np.int32),
              seq_id=np.full(p1 - p0, seq, np.int32), output=np.zeros(p1 - p0, bool))  # fmt: skip
    balloc = BatchAllocator()
    balloc.init(b, memory=mem, n_seq_max=N_SEQ)
    ctx = mem.init_batch(balloc, 256, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    while True:
        ctx.apply()
        if not ctx.next():
            break


def run(model: str, n_tokens: int, tmp: Path) -> dict[str, object]:
    fp = model_fingerprint(MODELS / model)
    rng = np.random.default_rng(0)
    pol = CheckpointPolicy(interval=n_tokens, n_batch=256, before_last_turn=False,
                           before_last_token=False, branch_points=False)  # fmt: skip
    mem, fresh = _memory(model), _memory(model)
    cache = PrefixCache(mem, policy=pol, fingerprint=fp)
    for s in range(N_SEQ):
        toks = as_tokens(rng.integers(1, 60, n_tokens))
        att = cache.attach(s, toks)
        for p0, p1 in att.chunks:
            _fill(mem, s, toks, p0, p1)
            cache.record(s, toks[:p1])
    entries = cache.entries()
    path, plain = tmp / "cache.pymem", tmp / "plain.pymem"
    n_file = cache.save(path)
    n_plain = write_container(plain, mem, fingerprint=fp)
    t_save = best_of(lambda: cache.save(path), repeat=5, number=1)
    t_plain_save = best_of(lambda: write_container(plain, mem, fingerprint=fp), repeat=5, number=1)
    t_load = best_of(lambda: PrefixCache.load(path, fresh, fingerprint=fp).close(), repeat=5, number=1)  # fmt: skip
    t_plain_load = best_of(lambda: load_container(plain, fresh, fingerprint=fp), repeat=5, number=1)  # fmt: skip
    loaded = PrefixCache.load(path, fresh, fingerprint=fp)
    same = fresh.state_write() == mem.state_write() and len(loaded.entries()) == len(entries)
    loaded.close()
    cache.close()
    mem.close()
    fresh.close()
    ck = sum(e.nbytes for e in entries)
    # the token section: held sequences, then entries no saved sequence holds (none here)
    data = path.read_bytes()
    idx = json.loads(data[16 : 16 + int.from_bytes(data[12:16], "little")])["prefix_cache"]
    n_tok = sum(n for _, n in idx["held"]) + sum(
        e["n_tokens"] for e in idx["entries"] if e["ref"] < 0
    )
    return {
        "model": model,
        "entries": len(entries),
        "file_bytes": n_file,
        "plain_container_bytes": n_plain,
        "checkpoint_bytes": ck,
        "token_bytes": 4 * n_tok,
        "save_ms": t_save * 1e3,
        "plain_save_ms": t_plain_save * 1e3,
        "load_ms": t_load * 1e3,
        "plain_load_ms": t_plain_load * 1e3,
        "round_trip_exact": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows, out = [], []
    with tempfile.TemporaryDirectory() as d:
        for model in PARAMS:
            r = run(model, args.tokens, Path(d))
            out.append(r)
            rows.append([
                model, r["entries"], r["file_bytes"], r["plain_container_bytes"],
                r["checkpoint_bytes"], r["token_bytes"], f"{r['save_ms']:.2f}", f"{r['plain_save_ms']:.2f}",
                f"{r['load_ms']:.2f}", f"{r['plain_load_ms']:.2f}", r["round_trip_exact"],
            ])  # fmt: skip
    print_table(
        f"prefix cache save/load: {N_SEQ} sequences x {args.tokens} tokens, one checkpoint each",
        ["model", "entries", "file B", "plain state B", "ckpt B", "tokens B", "save ms", "plain save ms",
         "load ms", "plain load ms", "exact"],
        rows,
    )  # fmt: skip
    path = write_results("bench_prefix_persist", {"tokens": args.tokens, "runs": out})
    if args.json:
        Path(args.json).write_text(path.read_text())
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
