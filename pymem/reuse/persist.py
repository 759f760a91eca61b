"""Saving a prefix cache with its memory, and restoring both: one checksummed file.

Why: a server that saves its memory state and restarts gets its cells back, but a
:class:`~pymem.reuse.PrefixCache` built afresh knows nothing of them (which tokens each
sequence holds, the checkpoints and their prefixes), so every restored conversation
decodes its prompt again, and every checkpoint is lost. The cache's knowledge is part of
the memory's state; it is saved and restored with it.

The file is a :mod:`pymem.container` (same prefix, JSON header, checksum), of kind
``"whole"``, whose header carries one more field, ``prefix_cache`` (the index), and whose
payload is three sections back to back::

    payload offset  what
    0               the memory's whole state: mem.state_write() (state_len bytes)
    state_len       int32 token ids: every held sequence's tokens, then the prefix of
                    every entry with ref -1 (lengths in the index, in index order)
    ...             the entries' checkpoint blobs (PARTIAL_ONLY state bytes), in order

    index = {"version": 1, "state_len": S, "clock": c, "budget_bytes": ...,
             "disk_budget_bytes": ..., "policy": {CheckpointPolicy fields},
             "held": [[seq_id, n_tokens], ...], "pending": [[seq_id, [pos, ...]], ...],
             "entries": [{"n_tokens", "ref", "pos_min", "seq_id", "tier",
                          "durable", "last_used", "blob_len"}, ...]}

An entry's prefix is the first ``n_tokens`` tokens of held sequence ``ref`` (one whose
tokens run through it), so a long history's checkpoints cost no tokens; ``ref`` -1 (no
saved sequence holds it: a recurrent memory keeps such checkpoints) stores them.

Disk-tier entries are copied in (the file stands alone: the cache's spill folder is
private and removed on close); one whose file fails its checks is left out. Because the
payload holds more than the state, :func:`pymem.container.load_container` refuses the
file (bytes left after the state) instead of misreading it.

Loading is two-phase: the checksum, the model fingerprint, the memory layout, the index
(held sequences must end where the saved state ends them, one checkpoint per prefix), the
section sizes and the memory state's parse are all checked, and the new cache's tree is
built, first; any failure raises a :class:`~pymem.errors.StateError` (a
:class:`~pymem.errors.ConfigError` for a bad argument or policy) and neither the memory
nor any cache has changed. Then the state is committed and the checkpoints are admitted
within the budget. Checkpoint blobs are covered by the checksum and parsed when restored
(a two-phase restore of its own), not at load.

What is not saved: a sequence the memory changed behind the cache's back (its next attach
would release it), the checkpoints only it made restorable, recurrent rollback planes
(memory state, not cache knowledge: a restored sequence goes back through checkpoints),
and the cache's counters (``n_taken``, ``peak_ram``, ...: they restart at 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import numpy as np

from pymem.container import (
    PREFIX_SIZE,
    ContainerHeader,
    check_layout,
    memory_layout,
    parse_container,
    write_atomic,
)
from pymem.errors import ConfigError, StateError
from pymem.memory import Memory
from pymem.reuse.checkpoints import Checkpoint, layout_of
from pymem.reuse.prefix_cache import CheckpointPolicy, PrefixCache, _Entry
from pymem.reuse.radix import TOKEN
from pymem.state import StateReader

INDEX_VERSION = 1


@dataclass(frozen=True)
class _EntryRec:
    """One checkpoint as saved: its prefix is ``n_tokens`` long (``pos = n_tokens - 1``),
    the first tokens of held sequence ``ref``, or ``tokens`` when ``ref`` is -1."""

    n_tokens: int
    ref: int
    tokens: np.ndarray
    pos_min: int
    seq_id: int
    tier: str
    durable: bool
    last_used: int
    blob: bytes


# --- saving -------------------------------------------------------------------------------


def save_prefix_cache(
    cache: PrefixCache, path: str | os.PathLike[str], *, fingerprint: str | None = None
) -> int:
    """Write ``cache``'s memory state and everything the cache knows to ``path``; bytes
    written. Changes nothing in the memory or the cache.

    ``fingerprint``: the model (default: the cache's own; one of the two must be set).
    Written beside ``path`` and renamed into place: readers never see half a file.
    """
    cache._check_open()
    fp = cache.fingerprint if fingerprint is None else fingerprint
    if not isinstance(fp, str) or not fp:
        raise ConfigError(f"fingerprint: a non-empty string naming the model, got {fp!r}")
    mem = cache.mem
    # a sequence the memory changed behind the cache's back is not saved as held (the
    # cache would release it at its next attach); checkpoints only it kept are dropped at load
    held = sorted((s, t) for s, t in cache._held.items() if cache._is_current(s))
    saved = 0
    for sid, _ in held:
        saved |= 1 << sid
    recs: list[_EntryRec] = []
    for tier, group in (("ram", cache._ram), ("disk", cache._disk)):
        for e in group:
            assert isinstance(e, _Entry)
            try:
                ck = cache._load(e)  # a disk entry is read and checked
            except StateError:
                continue  # a damaged spill file: left out (attach would drop it too)
            # a saved sequence through the entry's node holds its prefix: the entry names
            # it instead of repeating the tokens (E.g. live 0b0110 -> sequence 1)
            mask = e.node.live & saved
            ref = (mask & -mask).bit_length() - 1
            toks = e.node.tokens(e.depth).copy() if ref < 0 else np.empty(0, TOKEN)
            recs.append(
                _EntryRec(e.depth, ref, toks, e.pos_min, ck.seq_id, tier, e.durable,
                          e.last_used, ck.blob)
            )  # fmt: skip
    state_len = mem.state_size(-1, 0)
    index = {
        "version": INDEX_VERSION,
        "state_len": state_len,
        "clock": cache._clock,
        "budget_bytes": cache.budget_bytes,
        "disk_budget_bytes": cache.disk_budget_bytes,
        "policy": dataclasses.asdict(cache.policy),
        "held": [[s, len(t)] for s, t in held],
        "pending": [[s, sorted(p)] for s, p in sorted(cache._pending.items()) if saved >> s & 1],
        "entries": [
            {"n_tokens": r.n_tokens, "ref": r.ref, "pos_min": r.pos_min, "seq_id": r.seq_id,
             "tier": r.tier, "durable": r.durable, "last_used": r.last_used,
             "blob_len": len(r.blob)}
            for r in recs
        ],
    }  # fmt: skip
    token_bytes = [t.astype(TOKEN, copy=False).tobytes() for _, t in held]
    token_bytes += [r.tokens.astype(TOKEN, copy=False).tobytes() for r in recs if r.ref < 0]
    n_tok = sum(len(b) for b in token_bytes)
    n_blob = sum(len(r.blob) for r in recs)
    n_seq = max(int(cast(Any, p).n_seq_max) for p in mem.parts().values())
    pos = {s: (mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in range(n_seq)}
    header = ContainerHeader(
        kind="whole",
        seq_id=-1,
        flags=0,
        fingerprint=fp,
        memory=memory_layout(mem),
        pos={s: r for s, r in pos.items() if r[1] >= 0},
        tokens=(),
        payload_len=state_len + n_tok + n_blob,
    )
    doc = json.loads(header.to_json())
    doc["prefix_cache"] = index
    text = json.dumps(doc, separators=(",", ":")).encode()

    def payload(out: BinaryIO) -> None:
        n = mem.state_write_to(out, -1, 0)
        if n != state_len:
            raise StateError(f"payload: the memory wrote {n} bytes, state_size said {state_len}")
        for b in token_bytes:
            out.write(b)
        for r in recs:
            out.write(r.blob)

    return write_atomic(path, text, payload)


# --- loading ------------------------------------------------------------------------------


def _field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise StateError(f"{where}: field {key!r} is missing")
    v = doc[key]
    if isinstance(v, bool) and kind is not bool:
        raise StateError(f"{where}: field {key!r} has the wrong type: {v!r}")
    if not isinstance(v, kind):
        raise StateError(f"{where}: field {key!r} has the wrong type: {v!r}")
    return v


def _nonneg(doc: dict[str, Any], key: str, where: str) -> int:
    v = _field(doc, key, int, where)
    if v < 0:
        raise StateError(f"{where}: field {key!r} is {v}, must be >= 0")
    return int(v)


def load_prefix_cache(
    path: str | os.PathLike[str] | bytes | bytearray | memoryview,
    mem: Memory,
    *,
    fingerprint: str,
    budget_bytes: int | None = None,
    disk_dir: str | os.PathLike[str] | None = None,
    disk_budget_bytes: int | None = None,
) -> PrefixCache:
    """Restore a file written by :func:`save_prefix_cache` (``path``, or its bytes) into
    ``mem`` (its whole state is replaced) and return a new cache over it, knowing what the
    saved one knew.

    ``fingerprint``: this model; a file of another is refused. ``budget_bytes`` /
    ``disk_budget_bytes``: default the saved ones; a smaller budget evicts (least shared,
    then least recently used first, as always). ``disk_dir``: a disk tier for the new
    cache; saved disk-tier entries are spilled there again, or dropped without one.
    Nothing changes (memory, caches) unless every check passed; a cache that was over
    ``mem`` before is stale after a successful load: close it.
    """
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError(f"fingerprint: a non-empty string naming the model, got {fingerprint!r}")
    data: bytes | bytearray | memoryview
    if isinstance(path, (bytes, bytearray, memoryview)):
        where, data = "prefix cache bytes", path
    else:
        where = os.fspath(path)
        try:
            with open(where, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StateError(f"{where}: cannot read the file: {exc}") from None
    try:
        header, payload = parse_container(data)
    except StateError as exc:
        raise StateError(f"{where}: {exc}") from None
    if header.fingerprint != fingerprint:
        raise StateError(
            f"{where}: container header field fingerprint is {header.fingerprint!r}, this model "
            f"is {fingerprint!r} (a foreign model's state)"
        )
    try:
        check_layout(header.memory, mem)
    except StateError as exc:
        raise StateError(f"{where}: {exc}") from None
    if header.kind != "whole" or header.flags != 0:
        raise StateError(
            f"{where}: a {header.kind} state with flags {header.flags}; a saved prefix cache "
            "holds the whole memory (flags 0)"
        )
    doc = json.loads(bytes(data[PREFIX_SIZE : header.payload_offset]).decode())
    w = f"{where}: container header field prefix_cache"
    idx = _field(doc, "prefix_cache", dict, f"{where}: container header")
    if _field(idx, "version", int, w) != INDEX_VERSION:
        raise StateError(f"{w}: version {idx['version']}, pymem reads {INDEX_VERSION}")
    state_len = _nonneg(idx, "state_len", w)
    clock = _nonneg(idx, "clock", w)
    saved_budget = _nonneg(idx, "budget_bytes", w)
    saved_disk_budget = _nonneg(idx, "disk_budget_bytes", w)
    try:
        policy = CheckpointPolicy(**_field(idx, "policy", dict, w))
    except TypeError as exc:
        raise StateError(f"{w}.policy: {exc}") from None
    n_seq = max(int(cast(Any, p).n_seq_max) for p in mem.parts().values())
    held: list[tuple[int, int]] = []
    held_n: dict[int, int] = {}  # seq_id -> n_tokens
    for i, item in enumerate(_field(idx, "held", list, w)):
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in item)):  # fmt: skip
            raise StateError(f"{w}.held[{i}]: {item!r} is not [seq_id, n_tokens]")
        s, n = item
        if not 0 <= s < n_seq or s in held_n or n < 1:
            raise StateError(
                f"{w}.held[{i}]: seq_id {s} (this memory has {n_seq}, each once) or n_tokens "
                f"{n} (>= 1) out of range"
            )
        if header.pos.get(s, (-1, -1))[1] != n - 1:
            raise StateError(
                f"{w}.held[{i}]: sequence {s} holds {n} tokens, the saved state ends it at "
                f"position {header.pos.get(s, (-1, -1))[1]}"
            )
        held.append((s, n))
        held_n[s] = n
    pending: dict[int, set[int]] = {}
    for i, item in enumerate(_field(idx, "pending", list, w)):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)
                and item[0] in held_n and all(isinstance(p, int) for p in item[1])):  # fmt: skip
            raise StateError(f"{w}.pending[{i}]: {item!r} is not [held seq_id, [pos, ...]]")
        pending[item[0]] = set(item[1])
    entries: list[dict[str, Any]] = []
    for i, e in enumerate(_field(idx, "entries", list, w)):
        we = f"{w}.entries[{i}]"
        rec = {k: _nonneg(e, k, we) for k in ("n_tokens", "pos_min", "seq_id", "last_used", "blob_len")}  # fmt: skip
        rec["tier"] = _field(e, "tier", str, we)
        rec["durable"] = _field(e, "durable", bool, we)
        rec["ref"] = ref = _field(e, "ref", int, we)
        if rec["n_tokens"] < 1 or rec["tier"] not in ("ram", "disk"):
            raise StateError(f"{we}: n_tokens {rec['n_tokens']} (>= 1) or tier {rec['tier']!r}")
        if ref != -1 and rec["n_tokens"] > held_n.get(ref, -1):
            raise StateError(
                f"{we}: ref {ref} is not a held sequence (-1: own tokens) holding its "
                f"{rec['n_tokens']} tokens"
            )
        entries.append(rec)
    own = [e for e in entries if e["ref"] < 0]
    n_tok = sum(n for _, n in held) + sum(e["n_tokens"] for e in own)
    want = state_len + TOKEN.itemsize * n_tok + sum(e["blob_len"] for e in entries)
    if want != header.payload_len:
        raise StateError(
            f"{w}: state_len {state_len}, {n_tok} tokens and the blob lengths make a payload of "
            f"{want} bytes, the header's payload_len is {header.payload_len}"
        )
    # E.g. held [(0, 24), (1, 16)], own entries of 8 and 16 tokens -> cuts [0, 24, 40, 48, 64]
    toks = np.frombuffer(payload, dtype=TOKEN, count=n_tok, offset=state_len).copy()
    cuts = np.cumsum([0, *(n for _, n in held), *(e["n_tokens"] for e in own)])
    held_toks = {s: toks[cuts[k] : cuts[k + 1]] for k, (s, _) in enumerate(held)}
    for k, e in enumerate(own, start=len(held)):
        e["tokens"] = toks[cuts[k] : cuts[k + 1]]
    blob_at = state_len + TOKEN.itemsize * n_tok
    for e in entries:
        if e["ref"] >= 0:
            e["tokens"] = held_toks[e["ref"]][: e["n_tokens"]]
        e["blob"] = bytes(payload[blob_at : blob_at + e["blob_len"]])
        blob_at += e["blob_len"]
    reader = StateReader(payload[:state_len])
    try:
        plan = mem.state_read_parse(reader, -1, 0)
    except StateError as exc:
        raise StateError(f"{where}: payload at offset {header.payload_offset}: {exc}") from None
    if reader.remaining:
        raise StateError(
            f"{where}: the memory state ends {reader.remaining} bytes before state_len"
        )
    cache = PrefixCache(
        mem, policy=policy,
        budget_bytes=saved_budget if budget_bytes is None else budget_bytes,
        disk_dir=disk_dir, fingerprint=fingerprint,
        disk_budget_bytes=saved_disk_budget if disk_budget_bytes is None else disk_budget_bytes,
    )  # fmt: skip
    # the tree is built before the commit (it touches no memory): a second checkpoint for
    # one prefix is found here
    for s, t in held_toks.items():
        cache._set_held(s, t.copy())
    cache._pending = pending
    layout = layout_of(mem)
    made: list[tuple[_Entry, str]] = []
    for i, e in enumerate(entries):
        node = cache.tree.insert(e["tokens"])
        if e["n_tokens"] in node.payloads:
            cache.close()
            raise StateError(f"{w}.entries[{i}]: a second checkpoint for the same prefix")
        ck = Checkpoint(e["seq_id"], e["n_tokens"] - 1, e["blob"], layout)
        ent = _Entry(node, node.depth, e["pos_min"], ck.nbytes, e["last_used"], ckpt=ck,
                     durable=e["durable"])  # fmt: skip
        node.add_payload(ent)
        made.append((ent, e["tier"]))
    # --- commit: nothing below refuses ---
    plan.commit()
    for ent, _ in made:
        cache.tree.prune(ent.node)  # a split made for a payload merges back where it can
    if not cache.self_sufficient:
        # no live sequence holds the full-attention cells of its prefix: never restorable
        orphans = [x for x in made if not x[0].node.live]
        for ent, _ in orphans:
            cache._drop(ent)
        made = [x for x in made if x not in orphans]
    cache._clock = max([clock, *(e.last_used for e, _ in made)])
    # RAM entries are kept most valuable first (the reverse of the eviction order: most
    # shared, then most recently used) while they fit the budget, in their saved order;
    # the rest, and the disk tier, are spilled (or dropped without a disk tier)
    # E.g. budget 2 entries, eviction order [7, 12, 15, 23, 15'] -> keep 23 and 15'
    ram = [ent for ent, tier in made if tier == "ram"]
    room, keep = cache.budget_bytes, set()
    for ent in sorted(ram, key=lambda x: (cache._shared(x), x.last_used), reverse=True):
        if ent.nbytes > room:
            break
        keep.add(ent)
        room -= ent.nbytes
    for ent in ram:
        if ent in keep:
            cache._ram[ent] = None
            cache.bytes_ram += ent.nbytes
    cache.peak_ram = cache.bytes_ram
    for ent, _ in made:
        if ent not in keep:
            cache._evict(ent)
    cache.n_evicted = 0
    cache.hold_on(cache.where)  # the entries were read as host bytes
    return cache


__all__ = ["INDEX_VERSION", "load_prefix_cache", "save_prefix_cache"]
