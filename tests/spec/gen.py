"""Random configurations and programs for the stateful property tests.

One generator serves both hypothesis (``HypoRnd`` wraps ``st.data()``, so failures shrink)
and the soak runner (``PyRnd`` wraps ``random.Random``, so a seed replays a program).
Batches are mostly valid continuations of each sequence (positions from the spec's
``seq_pos_max + 1``), with a few deliberately wrong ones: gaps, restarts, out-of-range
sequence or token ids, coupled sequences.
"""

from __future__ import annotations

import random
from typing import Any

from .common import SwaType


class PyRnd:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, seq: list | tuple) -> Any:
        return seq[self.rng.randrange(len(seq))]


class HypoRnd:
    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data = data
        self.st = st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def chance(self, p: float) -> bool:
        # small integers shrink toward "no" (0); p is approximated in 1/20ths
        k = max(1, round(p * 20))
        return self.data.draw(self.st.integers(0, 19)) >= 20 - k

    def pick(self, seq: list | tuple) -> Any:
        return seq[self.data.draw(self.st.integers(0, len(seq) - 1))]


def random_config(kind: str, r: Any) -> Any:
    """A configuration of ``kind`` (see harness.Config)."""
    from .harness import Config

    n_seq_max = r.pick([1, 2, 3, 4, 4, 4, 8, 64])
    unified = r.chance(0.6)
    n_ubatch = r.pick([1, 2, 3, 4, 8, 8, 16, 32])
    kw: dict[str, Any] = dict(kind=kind, n_seq_max=n_seq_max, unified=unified, n_ubatch=n_ubatch)
    if kind in ("kv", "iswa", "hybrid", "hybrid_iswa"):
        kw["kv_size"] = r.pick([4, 8, 16, 16, 32, 64] if n_seq_max <= 8 or unified else [4, 8])
        kw["v_trans"] = r.chance(0.5)
        quant = r.chance(0.15)
        if quant:
            kw["head_dim"] = 32
            kw["type_k"] = "q8_0"
            kw["type_v"] = "f16" if kw["v_trans"] else r.pick(["q8_0", "f16"])
        else:
            t = r.pick(["f16", "f16", "f32", "bf16"])
            kw["type_k"] = t
            kw["type_v"] = t
            if r.chance(0.3):
                kw["v_dims"] = (8, 16)
    swa = kind in ("iswa", "hybrid_iswa") or (kind in ("kv", "hybrid") and r.chance(0.3))
    if swa:
        kw["swa_type"] = int(
            r.pick([SwaType.STANDARD, SwaType.STANDARD, SwaType.CHUNKED, SwaType.SYMMETRIC])
        )
        kw["n_swa"] = r.int(2, 8)
        kw["swa_size"] = r.pick([4, 6, 8, 16])
    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        kw["n_rs_seq"] = r.pick([0, 0, 1, 2, 3])
        if kw["n_rs_seq"] and r.chance(0.85):
            kw["n_ubatch"] = max(n_ubatch, kw["n_rs_seq"] + 2)
    layouts = {
        "kv": ["AA", "A", "AAA"],
        "iswa": ["AW", "WAW", "AWWA"],
        "recurrent": ["R", "RR"],
        "hybrid": ["RA", "ARRA", "RRA"],
        "hybrid_iswa": ["RAW", "WRAR"],
    }
    layout = r.pick(layouts[kind])
    if kind == "kv" and swa:
        layout = layout.replace("A", "W")  # one cache, every layer slides
    if kind == "hybrid" and swa:
        layout = layout.replace("A", "W")
    kw["layout"] = layout
    if kind in ("kv", "iswa", "hybrid") and r.chance(0.15):
        kw["n_pos"] = 4  # M-RoPE: 2-D positions, cells carry ext, no K-shift
    if kind in ("kv", "iswa") and r.chance(0.1):
        kw["alibi"] = True
    return Config(**kw)


def random_embd_batch(pair: Any, r: Any) -> tuple[list, list]:
    """An M-RoPE embedding batch: image-like patches, one temporal position per sequence,
    2-D (y, x) positions in the other sections. Returns ``(items, sections)``."""
    cfg = pair.cfg
    items: list[list] = []
    sections: list[tuple[int, ...]] = []
    for s in sorted({r.int(0, cfg.n_seq_max - 1) for _ in range(r.int(1, 2))}):
        t = max(pair.sp.seq_pos_max(s), 0) + r.int(0, 1)  # embeddings may overlap: X <= Y
        w = r.int(1, 3)
        for i in range(r.int(1, 6)):
            items.append([0, t, [s], r.chance(0.3)])
            sections.append((t, i // w, i % w, 0))
    return items, sections


def random_batch(pair: Any, r: Any) -> tuple[list, bool, bool]:
    """A batch for ``pair``: ``(items, embd_all, auto_pos)``."""
    cfg = pair.cfg
    sp = pair.sp
    n_seq = cfg.n_seq_max
    k = r.int(1, min(4, n_seq))
    first = r.int(0, n_seq - 1)
    seqs = sorted({(first + j * r.int(1, 3)) % n_seq for j in range(k)})
    per_seq: dict[int, list[list]] = {}
    for s in seqs:
        n = r.int(1, 6)
        start = sp.seq_pos_max(s) + 1
        if cfg.n_pos > 1:
            start += r.int(0, 2)  # M-RoPE positions may jump forward
        if r.chance(0.05):
            start = r.int(0, max(start + 2, 0))  # a restart or a jump: usually invalid
        toks = []
        p = start
        for _ in range(n):
            toks.append([r.int(0, 63), p, [s], r.chance(0.3)])
            p += 1
            if r.chance(0.015):
                p += 1  # a gap
        per_seq[s] = toks
    # coupled tokens: a prefix shared by two sequences with the same memory range
    if len(seqs) >= 2 and r.chance(0.12):
        a, b = seqs[0], seqs[1]
        if (sp.seq_pos_min(a), sp.seq_pos_max(a)) == (
            sp.seq_pos_min(b),
            sp.seq_pos_max(b),
        ) or r.chance(0.2):
            start = sp.seq_pos_max(a) + 1
            shared = [
                [r.int(0, 63), start + i, [a, b] if r.chance(0.5) else [b, a], False]
                for i in range(r.int(1, 3))
            ]
            nxt = start + len(shared)
            per_seq[a] = shared + [[t[0], nxt + i, [a], t[3]] for i, t in enumerate(per_seq[a])]
            per_seq[b] = [[t[0], nxt + i, [b], t[3]] for i, t in enumerate(per_seq[b])]
    # interleave, keeping each sequence's order
    items: list[list] = []
    queues = {s: list(v) for s, v in per_seq.items() if v}
    mode = r.int(0, 2)
    while queues:
        keys = sorted(queues)
        s = keys[0] if mode == 0 else r.pick(keys)
        items.append(queues[s].pop(0))
        if not queues[s]:
            del queues[s]
    if r.chance(0.03):
        items[r.int(0, len(items) - 1)][0] = 64  # token id out of range
    if r.chance(0.03):
        items[r.int(0, len(items) - 1)][2] = [n_seq]  # sequence id out of range
    embd_all = cfg.kind in ("recurrent", "hybrid", "hybrid_iswa") and r.chance(0.2)
    auto_pos = r.chance(0.04)
    return items, embd_all, auto_pos


def random_range(pair: Any, s: int, r: Any) -> tuple[int, int]:
    hi = max(pair.sp.seq_pos_max(s) if 0 <= s < pair.cfg.n_seq_max else 4, 1) + 2
    p0 = -1 if r.chance(0.3) else r.int(0, hi)
    p1 = -1 if r.chance(0.4) else r.int(0, hi + 1)
    return p0, p1


def random_seq(pair: Any, r: Any, allow_all: bool = False) -> int:
    n = pair.cfg.n_seq_max
    if allow_all and r.chance(0.1):
        return -1
    if r.chance(0.02):
        return n  # out of range
    return r.int(0, n - 1)


def foreign_config(cfg: Any, r: Any) -> Any:
    """The same memory type with one thing changed: sizes (the checkpoint's layout
    differs) or the layers (same layout, other rows)."""
    import dataclasses

    what = r.pick(["layers", "sizes"])
    if what == "layers":
        other = {"AW": "WAW", "WAW": "AW", "AWWA": "AW", "R": "RR", "RR": "R", "RA": "RRA"}
        other |= {"ARRA": "RA", "RRA": "RA", "RAW": "WRAR", "WRAR": "RAW", "A": "AA"}
        other |= {"AA": "A", "AAA": "A", "W": "WW", "WW": "W", "WWW": "W", "WRRW": "RW"}
        other |= {"RW": "RRW", "RRW": "RW"}
        return dataclasses.replace(cfg, layout=other.get(cfg.layout, cfg.layout))
    if cfg.kind in ("recurrent", "hybrid", "hybrid_iswa") and r.chance(0.5):
        return dataclasses.replace(cfg, n_rs_seq=(cfg.n_rs_seq + 1) % 3, n_ubatch=8)
    if cfg.kind == "recurrent":
        return dataclasses.replace(cfg, n_seq_max=cfg.n_seq_max + 1)
    return dataclasses.replace(cfg, kv_size=cfg.kv_size * 2)


def random_live_seq(pair: Any, r: Any) -> int:
    """A sequence id in range, mostly one that holds tokens."""
    live = [s for s in range(pair.cfg.n_seq_max) if pair.sp.seq_pos_max(s) >= 0]
    if live and r.chance(0.85):
        return r.pick(live)
    return r.int(0, pair.cfg.n_seq_max - 1)


def random_step(pair: Any, r: Any) -> str:
    """Run one random operation on ``pair``; returns its name."""
    cfg = pair.cfg
    op = r.pick(
        ["decode"] * 8
        + ["seq_rm"] * 3
        + ["seq_cp", "seq_cp", "seq_keep", "seq_add", "seq_add", "seq_div"]
        + ["save", "save", "load", "load", "clear"]
        + ["checkpoint", "restore", "rollback"]
        + PREFIX_OPS
    )
    if pair.pc is not None and r.chance(0.15):
        op = r.pick(PREFIX_OPS)  # once a prefix cache is there, it serves more requests
    if op.startswith("prefix"):
        random_prefix_step(pair, r, op)
        return op
    if op == "decode":
        if cfg.n_pos > 1 and r.chance(0.3):
            items, sections = random_embd_batch(pair, r)
            pair.decode(items, sections=sections)
        else:
            items, embd_all, auto_pos = random_batch(pair, r)
            pair.decode(items, embd_all=embd_all, auto_pos=auto_pos)
    elif op == "seq_rm":
        s = random_seq(pair, r, allow_all=True)
        pair.seq_op("seq_rm", s, *random_range(pair, s, r))
    elif op == "seq_cp":
        a = random_seq(pair, r)
        b = random_seq(pair, r)
        p0, p1 = (-1, -1) if r.chance(0.7) else random_range(pair, a, r)
        pair.seq_op("seq_cp", a, b, p0, p1)
    elif op == "seq_keep":
        pair.seq_op("seq_keep", random_seq(pair, r))
    elif op == "seq_add":
        s = random_seq(pair, r)
        pair.seq_op("seq_add", s, *random_range(pair, s, r), r.int(-4, 4))
    elif op == "seq_div":
        s = random_seq(pair, r)
        pair.seq_op("seq_div", s, *random_range(pair, s, r), r.pick([1, 2, 2, 3]))
    elif op == "save":
        flags = 1 if cfg.kind in ("iswa", "hybrid", "hybrid_iswa") and r.chance(0.25) else 0
        pair.state_save(-1 if r.chance(0.3) else r.int(0, cfg.n_seq_max - 1), flags)
    elif op == "load":
        if not pair.blobs:
            pair.state_save(-1 if r.chance(0.5) else r.int(0, cfg.n_seq_max - 1))
        if pair.blobs:
            i = r.int(0, len(pair.blobs) - 1)
            pair.state_load(i, r.int(0, cfg.n_seq_max - 1), cross=r.chance(0.12))
    elif op == "clear":
        pair.clear(r.chance(0.5))
    elif op == "checkpoint":
        if r.chance(0.1):
            pair.take_foreign_checkpoint(foreign_config(cfg, r))
        else:
            pair.take_checkpoint(random_live_seq(pair, r))
    elif op == "restore":
        if not pair.ckpts:
            pair.take_checkpoint(random_live_seq(pair, r))
        if pair.ckpts:
            i = r.int(0, len(pair.ckpts) - 1)
            src = pair.ckpts[i][1]
            dest = src.seq_id
            if r.chance(0.4):
                # another sequence, preferably one that shares the full-attention prefix
                reach = [
                    s
                    for s in range(cfg.n_seq_max)
                    if s != src.seq_id and pair.sp.seq_pos_max(s) >= src.pos
                ]
                dest = r.pick(reach) if reach and r.chance(0.8) else r.int(0, cfg.n_seq_max - 1)
            pair.restore_checkpoint(i, dest)
    elif op == "rollback":
        s = random_live_seq(pair, r)
        top = pair.sp.seq_pos_max(s)
        # mostly the last few tokens (what snapshot planes can serve), sometimes further
        lo = 0 if r.chance(0.2) else max(0, top - (3 if r.chance(0.6) else 8))
        pos = r.int(lo, max(lo, top + 1))
        mine = [sck.pos for _, sck in pair.ckpts if sck.seq_id == s]
        if mine and r.chance(0.5):
            pos = r.pick(mine) + r.int(1, 3)  # just after one of its checkpoints
        swa = [kv for kv in pair.sp.kv_parts.values() if kv.cfg.swa_type and top >= 0]
        if swa and r.chance(0.25):
            # near the oldest cell a window still holds: trims just inside / outside it
            pos = max(0, min(kv.seq_pos_min(s) for kv in swa) + r.int(-1, 3))
        pair.rollback(s, pos)
    return op


# --- the prefix cache --------------------------------------------------------------------

PREFIX_OPS = ["prefix_serve"] * 3 + ["prefix_attach", "prefix_lookup", "prefix_restore"]


def random_prefix_setup(pair: Any, r: Any) -> None:
    """A prefix cache with a small RAM budget (a few checkpoints: eviction happens)."""
    from .prefix import Policy

    # the first choice of each is the busiest (hypothesis draws shrink toward it)
    policy = Policy(
        interval=r.pick([4, 2, 3, 4, 8, 0]),
        before_last_turn=not r.chance(0.3),
        before_last_token=not r.chance(0.3),
        branch_points=not r.chance(0.3),
        n_batch=r.pick([4, 2, 3, 8, 8, 16]),
    )
    budget = r.pick([300, 150, 600, 600, 1200, 2400, 0, 1 << 20])
    pair.prefix_setup(policy, budget, r.pick(["keep", "none", "none", "drop"]))


def random_request(pair: Any, r: Any) -> tuple:
    """Tokens sharing a prefix with something cached (a held sequence, a checkpoint),
    mostly, then a few new ones; sometimes exactly what a sequence holds."""
    spc = pair.spc
    known = [*spc.held.values(), *(e.tokens for e in spc.entries())]
    base: tuple = r.pick(known) if known and r.chance(0.85) else ()
    keep = len(base) if r.chance(0.4) else r.int(0, len(base))
    toks = base[:keep]
    if not toks or r.chance(0.85):
        alphabet = r.pick([3, 64])  # a small one makes accidental common prefixes
        toks += tuple(r.int(0, alphabet - 1) for _ in range(r.int(1, 6)))
    return toks[:24]


def random_prefix_step(pair: Any, r: Any, op: str) -> None:
    if pair.pc is None:
        random_prefix_setup(pair, r)
    n = pair.cfg.n_seq_max
    tracked = sorted(pair.spc.held)
    seq = r.pick(tracked) if tracked and r.chance(0.5) else r.int(0, n - 1)
    if op == "prefix_lookup":
        pair.prefix_lookup(random_request(pair, r), -1 if r.chance(0.3) else seq)
    elif op in ("prefix_serve", "prefix_attach"):
        kind = r.pick(["prompt", "prompt", "prompt", "generate", "draft"])
        pair.prefix_attach(seq, random_request(pair, r), kind, serve=op == "prefix_serve")
    elif op == "prefix_restore" and pair.pc.bytes_disk and r.chance(0.2):
        pair.prefix_damage(r.int(0, 7))  # a spilled entry's file goes bad
    elif op == "prefix_restore":
        held = pair.spc.held.get(seq, ())
        mine = [e.pos for e in pair.spc.entries() if held[: len(e.tokens)] == e.tokens]
        pos = r.pick(mine) if mine and r.chance(0.9) else r.int(0, max(len(held), 1))
        pair.prefix_restore_entry(seq, pos)
