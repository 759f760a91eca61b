"""``python -m pymem demo``: a real model decodes through pymem and matches a full recompute.

The demo builds the tiny hybrid decoder of :mod:`pymem.runtime` (random weights from a
seed, nothing downloaded) and the memory :func:`pymem.factory.create_memory` gives it
(hybrid-iSWA by default: a full-attention KV cache, a sliding-window KV cache and a
Mamba-2 recurrent state memory), then serves a handful of sequences the way a server
does: prompts of different lengths in one batch, greedy decoding with continuous
batching (sequences joining and finishing), a fork (``seq_cp``), speculative drafts
rolled back with ``seq_rm`` (and a rollback the recurrent snapshots cannot cover,
refused), a context shift (``seq_rm`` + ``seq_add`` + K-shift), a save / restore
through a file into a second memory and into another sequence id, and prefix reuse: a
request that shares part of a live sequence's history is served through the session's
prefix cache (:meth:`Session.submit`: the shared cells copied, a checkpoint restored) and
decodes only the rest.

Every decoded token's logits are compared with a float64 numpy recompute of its whole
sequence from scratch (:class:`pymem.runtime.Oracle`). The summary gives, per memory part,
the cells in use, the bytes per device, tokens decoded, the per-step bookkeeping time
(what pymem adds to a decode step) and the parity result; the exit code is 1 if any
logit is off by more than the tolerance of the cache types. With matplotlib installed a
PNG shows which sequence held which cell over time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pymem.backend import devices, get_device
from pymem.errors import PymemError
from pymem.factory import ContextParams, create_memory
from pymem.recurrent import RecurrentMemory
from pymem.reuse import CheckpointPolicy, PrefixCache
from pymem.runtime.config import PRESETS, TinyConfig
from pymem.runtime.graph import TinyModel
from pymem.runtime.oracle import Oracle
from pymem.runtime.session import CheckResult, Session, memory_parts, tolerance_for, usage

LAYER_NAMES = {"A": "attention", "S": "sliding-window attention", "R": "Mamba-2"}


@dataclass
class DemoOptions:
    """Everything the demo can be asked to do (the command line, as a dataclass)."""

    memory_type: str = "hybrid_iswa"
    device: str = "auto"
    type_k: str = "f32"
    type_v: str = "f32"
    flash_attn: bool = False
    n_ctx: int = 256
    n_seq_max: int = 8
    n_ubatch: int = 512
    n_rs_seq: int = 2
    kv_unified: bool = True
    swa_full: bool = True
    n_swa: int = 6
    steps: int = 24
    seed: int = 0
    tolerance: float | None = None  # None: the stated tolerance of the cache types
    png: str | None = ""  # "" = default path in the temp dir, None = no plot
    verbose: bool = False


@dataclass
class DemoResult:
    ok: bool
    summary: str
    png: str | None = None
    max_err: float = 0.0
    n_checks: int = 0
    tol: float = 0.0
    events: list[str] = field(default_factory=list)


def _pick_device(name: str) -> str:
    if name != "auto":
        return get_device(name).name
    devs = devices()
    for d in devs:
        if d.kind == "gpu":
            return d.name
    return devs[0].name


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class _Log:
    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out, self.verbose = out, verbose

    def __call__(self, msg: str, always: bool = False) -> None:
        if always or self.verbose:
            print(msg, file=self.out)


def run(opts: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """Run the demo scenario; print the summary to ``out`` (default stdout)."""
    out = out if out is not None else sys.stdout
    log = _Log(out, opts.verbose)
    t_start = time.perf_counter()
    device = _pick_device(opts.device)
    cfg = TinyConfig.preset(opts.memory_type, n_swa=opts.n_swa, seed=opts.seed)
    spec = cfg.spec()
    params = ContextParams(
        n_ctx=opts.n_ctx, n_seq_max=opts.n_seq_max, n_ubatch=opts.n_ubatch, flash_attn=opts.flash_attn,
        kv_unified=opts.kv_unified, swa_full=opts.swa_full, type_k=opts.type_k, type_v=opts.type_v,
        n_rs_seq=opts.n_rs_seq, device=device,
    )  # fmt: skip
    model = TinyModel(cfg, device)
    oracle = Oracle(model.weights)
    if opts.tolerance is None:
        tol = tolerance_for(opts.type_k, opts.type_v, model, opts.flash_attn)
    else:
        tol = opts.tolerance
    rng = np.random.default_rng(opts.seed + 1)
    recurrent = "R" in cfg.layers

    try:
        mem = create_memory(spec, params)
    except BaseException:
        model.close()
        raise
    assert mem is not None
    n_seq_max = opts.n_seq_max
    # the prefix cache follows every sequence from the start (a checkpoint every 8 positions)
    cache = PrefixCache(mem, policy=CheckpointPolicy(interval=8, n_batch=opts.n_ubatch))
    s = Session(model, mem, n_seq_max=n_seq_max, n_ubatch=opts.n_ubatch, flash_attn=opts.flash_attn,
                tol=tol, oracle=oracle, prefix_cache=cache)  # fmt: skip
    restored: Session | None = None
    mem2 = None
    notes: list[str] = []
    peak_used: dict[str, int] = {}
    state_bytes = 0

    layers = ", ".join(f"{il}:{LAYER_NAMES[k]}" for il, k in enumerate(cfg.layers))
    log(f"pymem demo: {type(mem).__name__} ({opts.memory_type}) on {device}", always=True)
    log(
        f"  model: {cfg.n_layer} layers [{layers}], n_swa {cfg.n_swa}, vocab {cfg.n_vocab}",
        always=True,
    )
    attn_path = "flash_attn_ext (V by rows)" if opts.flash_attn else "soft_max_ext (V transposed)"
    log(f"  cache: K {opts.type_k}, V {opts.type_v}, {attn_path}, n_ctx {opts.n_ctx}, "
        f"n_seq_max {n_seq_max}, n_rs_seq {opts.n_rs_seq}, "
        f"{'unified' if opts.kv_unified else 'one stream per sequence'}", always=True)  # fmt: skip

    # every sequence fits in the memory at once: unified caches share n_ctx cells
    max_len = max(24, opts.n_ctx // n_seq_max)

    def seq_ids_free() -> list[int]:
        return [q for q in range(n_seq_max) if q not in s.histories]

    last: dict[int, np.ndarray] = {}  # last logits row of each sequence

    def greedy(q: int, rank: int = 0) -> int:
        return int(np.argsort(-last[q])[rank])

    def decode(requests: dict[int, list[int]], label: str, sess: Session | None = None) -> None:
        sess = sess or s
        got = sess.decode(requests, label)
        for q, rows in got.items():
            last[q] = rows[-1]
        r = sess.results[-len(requests) :]
        st = sess.decoder.stats.steps[-1]
        log(f"  [{sess.step:3d}] {label:34s} " + " ".join(f"s{x.seq_id}+{x.n_tokens}" for x in r)
            + f"  err {max(x.max_err for x in r):.1e}  bookkeeping {st.t_bookkeeping * 1e3:.2f} ms")  # fmt: skip
        for part in usage(sess.memory):
            used = int((part.owners != -1).sum())
            peak_used[part.name] = max(peak_used.get(part.name, 0), used)

    def step_all(label: str = "step") -> None:
        decode({q: [greedy(q)] for q in s.histories}, label)

    def prompt(n: int) -> list[int]:
        return rng.integers(0, cfg.n_vocab, n).tolist()

    try:
        # 1. three prompts of different lengths in one batch
        decode({0: prompt(12), 1: prompt(5), 2: prompt(8)}, "prompts of 12, 5 and 8 tokens")
        n_done = 1
        shifted = saved = forked = drafted = refused_tried = False
        while n_done < opts.steps:
            n_done += 1
            if n_done == 3 and seq_ids_free():
                q = seq_ids_free()[0]
                req = {x: [greedy(x)] for x in s.histories}
                req[q] = prompt(6)
                decode(req, f"step + seq {q} joins (6 tokens)")
                continue
            if n_done == 5 and not forked and seq_ids_free():
                dst = seq_ids_free()[0]
                s.fork(0, dst)
                last[dst] = last[0]
                log(f"  [{s.step:3d}] fork: seq_cp(0, {dst})")
                # both branches continue: 0 greedily, the fork with its second choice
                req = {x: [greedy(x)] for x in s.histories}
                req[dst] = [greedy(dst, rank=1)]
                decode(req, f"step, branches 0 and {dst} diverge")
                forked = True
                continue
            if n_done == 7 and not drafted:
                # speculative decoding on seq 1: the greedy token plus n_rs_seq guesses in
                # one ubatch; the guesses are wrong, so they are rolled back
                n_draft = opts.n_rs_seq + 1
                draft = [greedy(1), *prompt(n_draft - 1)]
                decode({1: draft}, f"seq 1 drafts {n_draft} tokens")
                ok = s.rollback(1, n_draft - 1)
                log(f"  [{s.step:3d}] rollback seq 1 by {n_draft - 1}: {'ok' if ok else 'REFUSED'}")
                notes.append(f"rollback of {n_draft - 1} drafted tokens (n_rs_seq {opts.n_rs_seq}): "
                             f"{'done' if ok else 'refused'}")  # fmt: skip
                if not ok:
                    s.results.append(_fail("rollback within n_rs_seq refused"))
                drafted = True
                continue
            if n_done == 8 and not refused_tried and 2 in s.histories:
                n_draft = opts.n_rs_seq + 2
                decode({2: [greedy(2), *prompt(n_draft - 1)]}, f"seq 2 drafts {n_draft} tokens")
                ok = s.rollback(2, n_draft - 1)
                expect = not recurrent
                log(f"  [{s.step:3d}] rollback seq 2 by {n_draft - 1}: {'ok' if ok else 'refused'}"
                    f" (expected {'ok' if expect else 'refused: beyond the recurrent snapshots'})")  # fmt: skip
                notes.append(f"rollback of {n_draft - 1} tokens (> n_rs_seq): {'done' if ok else 'refused'}"
                             f"{'' if ok == expect else ' UNEXPECTED'}")  # fmt: skip
                if ok != expect:
                    s.results.append(_fail("rollback beyond n_rs_seq"))
                refused_tried = True
                continue
            if n_done == 10 and 2 in s.histories:
                s.finish(2)
                log(f"  [{s.step:3d}] seq 2 finishes: seq_rm(2)")
                req = {x: [greedy(x)] for x in s.histories}
                q = seq_ids_free()[0]
                req[q] = prompt(9)
                decode(req, f"step + seq {q} joins (9 tokens)")
                continue
            if n_done == 12 and not shifted and 3 in s.histories:
                if mem.get_can_shift():
                    h = s.histories[3]
                    n_past = h.next_pos()
                    n_keep, n_discard = 2, (n_past - 2) // 2
                    if "S" in cfg.layers and n_past >= cfg.n_swa:
                        # an SWA cache may already have reused cells outside the window; after
                        # the shift the kept prefix must stay outside it, or it would need them
                        n_discard = min(n_discard, n_past + 1 - cfg.n_swa - n_keep)
                    s.context_shift(3, n_keep, n_keep + n_discard)
                    log(f"  [{s.step:3d}] context shift seq 3: drop [{n_keep}, {n_keep + n_discard}), "
                        f"shift the rest by -{n_discard}")  # fmt: skip
                    notes.append(f"context shift of seq 3: dropped {n_discard} of {n_past} positions, K-shift "
                                 "at the next decode")  # fmt: skip
                    step_all("step after the context shift")
                else:
                    notes.append(
                        "context shift skipped: this memory cannot shift (iSWA without swa_full)"
                    )
                shifted = True
                continue
            if n_done == 14 and not saved and 0 in s.histories:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "seq0.state"
                    state_bytes = int(s.save(0, path))
                    log(f"  [{s.step:3d}] state_write(seq 0) -> {path.name}: {state_bytes} bytes")
                    # a second memory, same configuration: restore as seq 0 and keep decoding
                    mem2 = create_memory(spec, params)
                    assert mem2 is not None
                    restored = Session(model, mem2, n_seq_max=n_seq_max, n_ubatch=opts.n_ubatch,
                                       flash_attn=opts.flash_attn, tol=tol, oracle=oracle)  # fmt: skip
                    restored.restore(path, 0, s.histories[0])
                    # and into this memory under another sequence id
                    copy_id = seq_ids_free()[0] if seq_ids_free() else None
                    if copy_id is not None:
                        s.restore(path, copy_id, s.histories[0])
                        last[copy_id] = last[0]
                notes.append(f"save/restore: seq 0 -> file ({state_bytes} bytes) -> second memory as seq 0"
                             + (f" and this memory as seq {copy_id}" if copy_id is not None else ""))  # fmt: skip
                req = {x: [greedy(x)] for x in s.histories}
                if copy_id is not None:
                    req[copy_id] = [greedy(copy_id, rank=2)]
                decode(req, f"step, restored copy seq {copy_id} diverges")
                for _ in range(3):
                    decode({0: [greedy(0)]}, "second memory: restored seq 0", sess=restored)
                saved = True
                continue
            # continuous batching: a sequence at its length budget finishes, a new one joins
            done = [
                q
                for q, h in s.histories.items()
                if h.next_pos() >= max_len and len(s.histories) > 1
            ]
            for q in done:
                s.finish(q)
                log(f"  [{s.step:3d}] seq {q} reached {max_len} positions and finishes")
            req = {x: [greedy(x)] for x in s.histories}
            label = "step"
            if done and seq_ids_free():
                q = seq_ids_free()[0]
                req[q] = prompt(int(rng.integers(4, 13)))
                label = f"step + seq {q} joins ({len(req[q])} tokens)"
            decode(req, label)
        # prefix reuse: a new request shares two thirds of a live sequence's history
        plain = [q for q, h in s.histories.items() if h.is_plain() and len(h) >= 6]
        if plain and seq_ids_free():
            src, dst = plain[0], seq_ids_free()[0]
            toks = s.histories[src].tokens
            k = len(toks) * 2 // 3
            asked = [*toks[:k], *prompt(3)]
            r = s.submit(dst, asked)
            last[dst] = r.logits
            m = r.attach.match
            err = max(x.max_err for x in s.results[-len(r.attach.chunks) :])
            log(f"  [{s.step:3d}] submit seq {dst}: {len(asked)} tokens, {k} shared with seq {src}: "
                f"{m.how} ({m.source}), {r.n_reused} reused, {r.n_decoded} decoded  err {err:.1e}")  # fmt: skip
            notes.append(f"prefix reuse: seq {dst} asked for {len(asked)} tokens ({k} shared with seq "
                         f"{src}): {m.how} from {m.source}, {r.n_reused} reused, {r.n_decoded} "
                         f"decoded; {cache.n_taken} checkpoints taken, "
                         f"{cache.memory_breakdown()['ram']} B held")  # fmt: skip
        for q in sorted(s.histories)[:-1]:
            s.finish(q)
        log(f"  [{s.step:3d}] finish all but seq {sorted(s.histories)[-1]}")
        s.expect_positions()

        elapsed = time.perf_counter() - t_start
        png = None
        if opts.png is not None:
            png = _plot(s, opts, device, Path(opts.png) if opts.png else None, notes)
        result = _summary(s, restored, mem, opts, device, tol, peak_used, notes, elapsed, png)
        print(result.summary, file=out)
        return result
    finally:
        cache.close()
        mem.close()
        if mem2 is not None:
            mem2.close()
        model.close()


def _fail(label: str) -> Any:
    """A failed check that is not a logit comparison (a sequence op gave the wrong answer)."""
    return CheckResult(label, -1, 0, float("inf"), False)


def _summary(s: Any, restored: Any, mem: Any, opts: DemoOptions, device: str, tol: float,
             peak_used: dict[str, int], notes: list[str], elapsed: float,
             png: str | None) -> DemoResult:  # fmt: skip
    lines = ["", "memory parts (at the end; peak over the run):"]
    lines.append(
        f"  {'part':10s} {'cells used':>12s} {'peak':>6s} {'total':>7s}   bytes per device"
    )
    for (name, part), u in zip(memory_parts(mem).items(), usage(mem), strict=True):
        used = int((u.owners != -1).sum())
        total = int(u.owners.size)
        extra = ""
        if isinstance(part, RecurrentMemory) and part.n_rs_seq:
            extra = f" (+{part.n_rs_seq} snapshot planes)"
        devs = ", ".join(f"{d}: {_fmt_bytes(b)}" for d, b in u.bytes_by_device.items())
        lines.append(
            f"  {name:10s} {used:12d} {peak_used.get(name, used):6d} {total:7d}   {devs}{extra}"
        )
    stats = s.decoder.stats
    book = np.array([st.t_bookkeeping for st in stats.steps]) * 1e3
    graph = np.array([st.t_graph for st in stats.steps]) * 1e3
    n_ub = sum(st.n_ubatches for st in stats.steps)
    lines.append("")
    lines.append(f"decoded: {stats.n_tokens} tokens in {len(stats.steps)} decode calls ({n_ub} ubatches), "
                 f"{s.n_started} sequences served ({s.n_started - len(s.histories)} finished)")  # fmt: skip
    lines.append(f"bookkeeping per decode call (batch checks, K-shift, slot planning, apply, graph inputs): "
                 f"mean {book.mean():.2f} ms, median {np.median(book):.2f} ms, max {book.max():.2f} ms")  # fmt: skip
    lines.append(
        f"graph compute per decode call (the model, for scale): mean {graph.mean():.2f} ms"
    )
    lines.append(f"sequence ops and state I/O: {s.t_ops * 1e3:.2f} ms in total")
    for note in notes:
        lines.append(f"  - {note}")
    results = list(s.results) + (list(restored.results) if restored is not None else [])
    max_err = max((r.max_err for r in results), default=0.0)
    ok = all(r.ok for r in results) and bool(results)
    n_tok = sum(r.n_tokens for r in results)
    lines.append("")
    verdict = "PASS" if ok else "FAIL"
    lines.append(f"parity vs full numpy recompute: {verdict}: max |logit error| {max_err:.2e} over {n_tok} "
                 f"tokens in {len(results)} checks (tolerance {tol:g} for K {opts.type_k} / V {opts.type_v})")  # fmt: skip
    if not ok:
        for r in [r for r in results if not r.ok][:10]:
            lines.append(f"  FAILED: {r.label} seq {r.seq_id}: error {r.max_err:.3e}")
    if png:
        lines.append(f"cache occupancy plot: {png}")
    elif opts.png is not None:
        lines.append("cache occupancy plot: skipped (pip install matplotlib, or pymem[demo])")
    lines.append(f"done in {elapsed:.1f} s")
    return DemoResult(ok, "\n".join(lines), png, max_err, len(results), tol, list(s.events))


def _plot(
    s: Any, opts: DemoOptions, device: str, path: Path | None, notes: list[str]
) -> str | None:
    """Cells x time per memory part, coloured by the sequence holding each cell."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError:
        return None
    path = path or Path(tempfile.gettempdir()) / f"pymem-demo-{opts.memory_type}.png"
    names = [p.name for p in s.timeline[0][1]]
    n_t = len(s.timeline)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(max(8.0, 0.22 * n_t + 3), 2.6 * len(names)), squeeze=False
    )
    # colours: white free, grey shared, tab10 per sequence id
    base = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    cmap = ListedColormap(["white", "0.55", *base])
    for ax, name in zip(axes[:, 0], names, strict=True):
        cols = [next(p.owners for p in parts if p.name == name) for _, parts in s.timeline]
        grid = np.stack(cols, axis=1)  # [cells, time]
        used_rows = np.flatnonzero((grid != -1).any(axis=1))
        top = int(used_rows.max()) + 2 if used_rows.size else 4
        grid = grid[:top]
        # E.g. owner -1 -> 0 (free), -2 -> 1 (shared), seq q -> 2 + q % 10
        img = np.where(grid == -1, 0, np.where(grid == -2, 1, 2 + np.mod(grid, 10)))
        ax.imshow(
            img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=11, origin="lower"
        )
        ax.set_ylabel(f"{name}\ncell")
        ax.set_xlim(-0.5, n_t - 0.5)
        for t, (label, _) in enumerate(s.timeline):
            if not label.startswith(("decode", "step", "prompts")):
                ax.axvline(t, color="black", lw=0.6, ls=":")
    ax = axes[-1, 0]
    ax.set_xticks(range(n_t))
    ax.set_xticklabels([label[:28] for label, _ in s.timeline], rotation=90, fontsize=6)
    for a in axes[:-1, 0]:
        a.set_xticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=base[q % 10]) for q in range(opts.n_seq_max)]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="0.55"))
    fig.legend(handles, [f"seq {q}" for q in range(opts.n_seq_max)] + ["shared"], loc="upper right",
               ncol=min(5, opts.n_seq_max + 1), fontsize=7)  # fmt: skip
    fig.suptitle(
        f"pymem {opts.memory_type} on {device}: which sequence holds each cell", fontsize=10, x=0.3
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def add_demo_parser(subparsers: Any) -> None:
    """Register ``demo`` on the ``python -m pymem`` command line."""
    d = DemoOptions()
    p = subparsers.add_parser(
        "demo", help="decode a tiny hybrid model through pymem and check it against a full recompute",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--memory-type",
        choices=sorted(PRESETS),
        default=d.memory_type,
        help="which memory (and the tiny model that needs it); default %(default)s",
    )
    p.add_argument(
        "--device", default=d.device, help="ggml device name, or auto (first GPU, else CPU)"
    )
    p.add_argument(
        "--type-k",
        default=d.type_k,
        help="K cache type: f32, f16, bf16, q8_0 (default %(default)s)",
    )
    p.add_argument("--type-v", default=d.type_v, help="V cache type (q8_0 needs --flash-attn)")
    p.add_argument(
        "--flash-attn",
        action="store_true",
        help="V by rows and flash_attn_ext (default: V transposed)",
    )
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help="context cells (default %(default)s)")
    p.add_argument(
        "--n-seq-max", type=int, default=d.n_seq_max, help="max sequences (default %(default)s)"
    )
    p.add_argument(
        "--n-ubatch",
        type=int,
        default=d.n_ubatch,
        help="max tokens per ubatch (default %(default)s)",
    )
    p.add_argument(
        "--n-rs-seq",
        type=int,
        default=d.n_rs_seq,
        help="recurrent rollback snapshots (default %(default)s)",
    )
    p.add_argument(
        "--n-swa", type=int, default=d.n_swa, help="sliding window (default %(default)s)"
    )
    p.add_argument(
        "--no-kv-unified",
        dest="kv_unified",
        action="store_false",
        help="one KV stream per sequence",
    )
    p.add_argument(
        "--no-swa-full",
        dest="swa_full",
        action="store_false",
        help="small SWA cache (then no context shift, as in llama.cpp)",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="decode calls (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="weights and prompts seed")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs logit error (default: stated per cache type, 2e-5 for f32)",
    )
    p.add_argument(
        "--png", default=d.png, help="where to write the occupancy plot (default: temp dir)"
    )
    p.add_argument("--no-png", dest="png", action="store_const", const=None, help="no plot")
    p.add_argument("-v", "--verbose", action="store_true", help="print every step")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    fields = DemoOptions.__dataclass_fields__
    opts = DemoOptions(**{k: v for k, v in vars(args).items() if k in fields})

    try:
        result = run(opts)
    except PymemError as e:
        print(f"pymem demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1
