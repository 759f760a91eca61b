"""Build spec memories for the recorded llama.cpp runs and replay their steps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .batch import BatchIn
from .common import SpecAbort, SpecStateError, SwaType
from .decode import decode, seq_blob, seq_blob_payload, whole_blob, whole_blob_payload
from .kv import KVConfig, KVLayer
from .layout import layout
from .memory import HybridMemory, ISWAMemory, KVMemory, RecurrentMemory, SpecMemory
from .recurrent import RSConfig

DATA = Path(__file__).resolve().parent.parent / "data"

SWA_TYPES = {
    "none": SwaType.NONE,
    "standard": SwaType.STANDARD,
    "chunked": SwaType.CHUNKED,
    "symmetric": SwaType.SYMMETRIC,
}


def load_run(name: str) -> dict:
    return json.loads((DATA / "runs" / f"{name}.json").read_text())


def load_blob(blob_id: str) -> bytes:
    return (DATA / "blobs" / f"{blob_id}.bin").read_bytes()


def _kv_cfg(run: dict, part: dict) -> KVConfig:
    mem = run["memory"]
    return KVConfig(
        layers=[
            KVLayer(ly["il"], ly["n_embd_k_gqa"], ly["n_embd_v_gqa"], ly.get("has_v", True))
            for ly in part["layers"]
        ],
        kv_size=part["kv_size"],
        n_seq_max=part["n_seq_max"],
        unified=part["n_stream"] == 1,
        type_k=part["k_type"],
        type_v=part["v_type"],
        v_trans=part["v_trans"],
        n_swa=part["n_swa"],
        swa_type=SWA_TYPES[part["swa_type"]],
        n_pad=part["n_pad"],
        has_cell_ext=part["has_cell_ext"],
        n_embd_v_gqa_max=max(ly["n_embd_v_gqa"] for ly in mem["layers"]),
        rope_none=run["model_info"].get("rope_type", -1) == -1,
    )


def _rs_cfg(part: dict) -> RSConfig:
    return RSConfig(
        n_layer_total=part["n_layer_total"],
        layers=[ly["il"] for ly in part["layers"]],
        n_embd_r=part["layers"][0]["n_embd_r"],
        n_embd_s=part["layers"][0]["n_embd_s"],
        mem_size=part["mem_size"],
        n_seq_max=part["n_seq_max"],
        n_rs_seq=part["n_rs_seq"],
        type_r=part["r_type"],
        type_s=part["s_type"],
    )


def build_memory(run: dict) -> SpecMemory:
    mem = run["memory"]
    parts = {p["name"]: p for p in mem["parts"]}
    kinds = [p["kind"] for p in mem["parts"]]
    if mem["type"] == "kv_cache":
        return KVMemory(_kv_cfg(run, mem["parts"][0]))
    if mem["type"] == "recurrent":
        return RecurrentMemory(_rs_cfg(mem["parts"][0]))
    if mem["type"] == "iswa":
        return ISWAMemory(_kv_cfg(run, parts["base"]), _kv_cfg(run, parts["swa"]))
    if mem["type"] == "hybrid":
        rs = _rs_cfg(next(p for p in mem["parts"] if p["kind"] == "recurrent"))
        kvp = [p for p in mem["parts"] if p["kind"] == "kv"]
        if len(kvp) == 1:
            return HybridMemory(KVMemory(_kv_cfg(run, kvp[0])), rs)
        return HybridMemory(ISWAMemory(_kv_cfg(run, kvp[0]), _kv_cfg(run, kvp[1])), rs)
    raise ValueError(f"unknown memory type {mem['type']} ({kinds})")


@dataclass
class StepCheck:
    """What the spec observed after one step, beside what the reference recorded."""

    i: int
    op: str
    problems: list[str] = field(default_factory=list)


def apply_step(mem: SpecMemory, run: dict, step: dict):
    """Run one recorded step on the spec; returns its result in the run's encoding."""
    op = step["op"]
    cp = run["context_params"]
    arch = run["memory"]["arch"]
    if op == "none":
        return None
    if op == "decode":
        return decode(
            mem,
            BatchIn.from_items(step["items"]),
            n_seq_max=cp["n_seq_max"],
            n_vocab=run["model_info"]["n_vocab"],
            n_ubatch=cp["n_ubatch"],
        )
    if op == "seq_rm":
        return mem.seq_rm(step["seq"], step["p0"], step["p1"])
    if op == "seq_cp":
        mem.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        return None
    if op == "seq_keep":
        mem.seq_keep(step["seq"])
        return None
    if op == "seq_add":
        mem.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        return None
    if op == "seq_div":
        mem.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
        return None
    if op == "clear":
        mem.clear(step.get("data", True))
        return None
    if op == "state_seq_set":
        blob = load_blob(step["blob"])
        try:
            payload = seq_blob_payload(blob)
            used = mem.state_read(payload, step["seq"], atomic=False)
        except SpecStateError:
            return 0
        return 8 + used
    if op == "state_set":
        blob = load_blob(step["blob"])
        try:
            payload = whole_blob_payload(blob, arch)
            used = mem.state_read(payload, -1, atomic=False)
        except SpecStateError:
            return 0
        return len(blob) - len(payload) + used
    raise ValueError(f"unknown op {op}")


def check_step(mem: SpecMemory, run: dict, step: dict, result) -> StepCheck:
    chk = StepCheck(step["i"], step["op"])
    arch = run["memory"]["arch"]
    if result != step["result"]:
        chk.problems.append(f"result {result!r} != reference {step['result']!r}")
    n_seq = run["n_seq"]
    pos = [[mem.seq_pos_min(s), mem.seq_pos_max(s)] for s in range(n_seq)]
    if pos != step["pos"]:
        chk.problems.append(f"pos {pos} != reference {step['pos']}")
    seq_blobs = [seq_blob(s, mem.state_write(s)) for s in range(n_seq)]
    whole = whole_blob(arch, mem.state_write(-1))
    sizes = [len(b) for b in seq_blobs]
    if "seq_state_bytes" in step and sizes != step["seq_state_bytes"]:
        chk.problems.append(f"seq_state_bytes {sizes} != reference {step['seq_state_bytes']}")
    if "state_bytes" in step and len(whole) != step["state_bytes"]:
        chk.problems.append(f"state_bytes {len(whole)} != reference {step['state_bytes']}")
    for s, blob_id in enumerate(step.get("seq_state", [])):
        ref = layout(mem, seq_blob_payload(load_blob(blob_id)), s)
        got = layout(mem, seq_blob_payload(seq_blobs[s]), s)
        if ref != got:
            chk.problems.append(f"seq {s} blob metadata differs: {_first_diff(ref, got)}")
    if "state" in step:
        ref = layout(mem, whole_blob_payload(load_blob(step["state"]), arch))
        got = layout(mem, whole_blob_payload(whole, arch))
        if ref != got:
            chk.problems.append(f"whole blob metadata differs: {_first_diff(ref, got)}")
    return chk


def _first_diff(a: list, b: list) -> str:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"field {k}: reference {x} vs spec {y}"
    return f"lengths {len(a)} vs {len(b)}"


def replay(name: str) -> list[StepCheck]:
    run = load_run(name)
    mem = build_memory(run)
    out = []
    for step in run["steps"]:
        try:
            result = apply_step(mem, run, step)
        except SpecAbort as e:
            c = StepCheck(step["i"], step["op"], [f"spec abort: {e}"])
            out.append(c)
            continue
        out.append(check_step(mem, run, step, result))
    return out
