"""Run by tests/test_rpc.py in a fresh interpreter bound to a ggml built with GGML_RPC.

Usage: python tests/rpc_worker.py RPC_SERVER_BINARY N_SERVERS

Starts N_SERVERS ``rpc-server`` processes on free 127.0.0.1 ports (killed in ``finally``;
each lives at most SERVER_LIFETIME_S), adds them as devices, and builds tiny-jamba's
hybrid memory twice through the factory: once with its layers spread over the CPU and
the servers, once on the CPU alone. The same bookkeeping decodes, row writes, sequence
ops (with a K-shift) and state round trips run on both; every tensor's bytes, every
state blob (whole and per sequence) and the state read back must be byte-identical.
Prints one JSON line (devices, memory_breakdown, timings); exits non-zero on a mismatch.
With N_SERVERS = "engine": the GGUF engine and the whole memory on one server, decoding
two sequences; logits and state compared with the CPU (printed, asserted by the test).
With N_SERVERS = "split1" / "split2": recorded runs (SPLIT_RUNS: tiny-jamba, llama,
lfm2, gemma2) replayed by the GGUF engine (weights on the CPU; with two servers jamba also
with the weights on one) over a memory whose K/V and R/S layers are split between the CPU
and the servers (ggml's scheduler computes each graph), and over a CPU-only memory; the
JSON says how many decodes' logits and state blobs are byte-identical (the test asserts
all).
With N_SERVERS = "gone": a server killed between a ubatch's apply and its graph; the
engine's next graph, state I/O and a cleared memory raise DeviceError instead of letting
ggml abort, and closing everything and exiting take no abort either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SERVER_LIFETIME_S = 120
MODEL = Path(__file__).parent / "data" / "models" / "tiny-jamba.gguf"
N_SEQ = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(binary: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        # one thread, as the engine's CPU backend: every kernel reduces in the same order
        ["timeout", str(SERVER_LIFETIME_S), binary, "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # timeout and the server in one group: stop() ends both
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"rpc-server on port {port} did not start") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a server started by :func:`start_server` (its ``timeout`` wrapper and itself)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def prompt(seq: int, n: int, p0: int = 0, tok0: int = 1) -> list:
    return [((tok0 + i) % 60, p0 + i, [seq], i == n - 1) for i in range(n)]


def decode(mem: Any, items: list) -> None:
    from pymem.batch import Batch, BatchAllocator
    from pymem.memory import MemoryStatus

    balloc = BatchAllocator()
    balloc.init(Batch.from_items(items), memory=mem, n_seq_max=N_SEQ)
    upd = mem.init_update()
    if upd.get_status() == MemoryStatus.SUCCESS:
        upd.apply()
    ctx = mem.init_batch(balloc, 16, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS, ctx.get_status()
    while True:
        ctx.apply()
        if not ctx.next():
            break


def tensors(mem: Any) -> list[Any]:
    kv, rec = mem.parts()["attention"], mem.parts()["recurrent"]
    out = [t for lay in kv.layers for t in (lay.k, lay.v) if t is not None]
    return out + [t for il in rec.layers for t in (rec.get_r_l(il), rec.get_s_l(il))]


def scribble(mem: Any, seed: int) -> None:
    """Random rows into every tensor (stands in for the graph's writes), one call each."""
    rng = np.random.default_rng(seed)
    for t in tensors(mem):
        rows = np.sort(rng.choice(t.n_rows, size=max(1, t.n_rows // 3), replace=False))
        t.write_rows(rows, rng.integers(0, 256, (rows.size, t.row_size), dtype=np.uint8))


def snapshot(mem: Any) -> dict[str, bytes]:
    out = {t.name: bytes(t.read_bytes()) for t in tensors(mem)}
    out["state"] = bytes(mem.state_write())
    for s in range(N_SEQ):
        out[f"state_seq{s}"] = bytes(mem.state_write(s))
    return out


def same(a: dict[str, bytes], b: dict[str, bytes], when: str) -> None:
    assert a.keys() == b.keys(), (when, sorted(a), sorted(b))
    bad = [k for k in a if a[k] != b[k]]
    assert not bad, f"{when}: differ from the CPU-only memory: {bad}"


def engine_logits(device: str, items: list) -> tuple[np.ndarray, bytes]:
    """The GGUF engine with weights and memory on ``device``: logits, state blob."""
    import pymem
    from pymem.batch import Batch, BatchAllocator
    from pymem.factory import ContextParams, create_memory
    from pymem.memory import MemoryStatus
    from pymem.runtime.decoder import step_inputs
    from pymem.runtime.gguf_llama import GGUFModel

    spec = pymem.spec_from_gguf(MODEL)
    mem = create_memory(
        spec, ContextParams(n_ctx=64, n_seq_max=N_SEQ, n_batch=32, n_ubatch=16,
                            flash_attn=False, device=device),
    )  # fmt: skip
    engine = GGUFModel(MODEL, device=device)
    balloc = BatchAllocator()
    balloc.init(Batch.from_items(items), memory=mem, n_seq_max=N_SEQ)
    ctx = mem.init_batch(balloc, 16, False)
    assert ctx.get_status() == MemoryStatus.SUCCESS
    rows: dict[int, np.ndarray] = {}
    while True:
        ctx.apply()
        ub = ctx.get_ubatch()
        out = engine.forward(ub, step_inputs(ctx, ub, False), False)
        for i in np.flatnonzero(ub.output):  # out has a (NaN) row for every token
            rows[int(ub.batch_idxs[i])] = out[i]
        if not ctx.next():
            break
    blob = bytes(mem.state_write())
    engine.close()
    mem.close()
    return np.stack([rows[b] for b in sorted(rows)]), blob


def main_engine(binary: str) -> None:
    """The model and its whole memory on one rpc-server: the one-device runner there."""
    proc, endpoint = start_server(binary)
    try:
        import pymem

        dev = pymem.add_rpc_device(endpoint).name
        items = [((7 * i + 3) % 60 + 1, i, [s], i == 5) for s in range(N_SEQ) for i in range(6)]
        got, got_state = engine_logits(dev, items)
        want, want_state = engine_logits("CPU", items)
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        print(json.dumps(dict(device=dev, rows=int(got.shape[0]), max_rel=rel,
                              identical=bool(np.array_equal(got, want)),
                              state_identical=got_state == want_state)))  # fmt: skip
    finally:
        stop(proc)


RUN = Path(__file__).parent / "data" / "runs" / "jamba.main.fa1.u0.json"


def split_placements(rpc: list[str]) -> dict[int, str]:
    """Jamba's layers (0 R/S, 1 K/V, 2 R/S, 3 K/V) so that each kind has a layer on the CPU
    or on another server than its twin: one server {0: CPU, 1: RPC0, 2: RPC0, 3: CPU};
    two {0: RPC0, 1: CPU, 2: RPC1, 3: RPC0}."""
    if len(rpc) == 1:
        return {0: "CPU", 1: rpc[0], 2: rpc[0], 3: "CPU"}
    return {0: rpc[0], 1: "CPU", 2: rpc[1], 3: rpc[0]}


class Capture:
    """Replay hooks: the engine computes every ubatch; every decode's logits (batch order)
    and every state blob pymem writes are kept, compared with the recording only to report."""

    def __init__(self, model: Any, flash_attn: bool) -> None:
        self.model = model
        self.flash_attn = flash_attn
        self.rows: dict[int, np.ndarray] = {}
        self.logits: list[np.ndarray] = []
        self.blobs: list[tuple[str, bytes]] = []
        self.logits_as_recorded = 0
        self.blobs_as_recorded = 0
        self.max_rel_to_recording = 0.0  # decodes before the first seq_div
        self.after_seq_div = False

    def forward(self, mctx: Any, ubatch: Any) -> None:
        from pymem.runtime.decoder import step_inputs

        inputs = step_inputs(mctx, ubatch, self.flash_attn)
        out = self.model.forward(ubatch, inputs, self.flash_attn)
        for i in np.flatnonzero(ubatch.output):
            self.rows[int(ubatch.batch_idxs[i])] = out[i]

    def before_op(self, step: dict[str, Any], mem: Any, where: str) -> None:
        self.rows = {}
        # the reference's K-shift after seq_div has the other sign (tests/test_gguf_llama.py
        # re-enacts it); not re-enacted here, so later logits are not the recording's
        self.after_seq_div = self.after_seq_div or step["op"] == "seq_div"

    def after_op(self, step: dict[str, Any], mem: Any, result: Any, where: str) -> None:
        if step["op"] == "decode" and result == 0 and "logits" in step:
            got = np.stack([self.rows[b] for b in sorted(self.rows)])
            self.logits.append(got)
            want = np.frombuffer(self.run_blob(step["logits"]), dtype=np.float32)
            self.logits_as_recorded += bool(np.array_equal(got.reshape(-1), want))
            if not self.after_seq_div:
                rel = float(np.abs(got.reshape(-1) - want).max() / np.abs(want).max())
                self.max_rel_to_recording = max(self.max_rel_to_recording, rel)

    def compare_blob(self, kind: str, got: bytes, want: bytes, where: str) -> None:
        self.blobs.append((f"{where} {kind}", got))
        self.blobs_as_recorded += got == want

    run_blob: Any = None


def replay_engine(
    model: Any, placement: dict[int, str] | None, path: Path = RUN
) -> tuple[Capture, float]:
    """The recorded run over a memory placed by ``placement`` (None: the CPU alone)."""
    import dataclasses

    from replay import Run, replay

    from pymem.factory import ContextParams, create_memory

    run = Run.load(path)
    params = ContextParams.from_dict(run.data["context_params"])
    if placement is not None:
        params = dataclasses.replace(params, device=placement)
    mem = create_memory(run.spec(), params)
    hooks = Capture(model, bool(run.data["memory"]["flash_attn"]))
    hooks.run_blob = run.blob
    t0 = time.perf_counter()
    try:
        report = replay(run, mem, hooks)  # type: ignore[arg-type]
    finally:
        breakdown = mem.memory_breakdown()
        mem.close()
    assert report.steps == len(run.data["steps"]), report
    if placement is not None:
        assert set(breakdown) == set(placement.values()), breakdown
    return hooks, time.perf_counter() - t0


def foreign_device_error(rpc: list[str]) -> str | None:
    """A runner over the CPU and the first server given a graph writing a tensor on the
    second: the DeviceError's message (None if nothing was raised)."""
    import pymem.ggml as gg
    from pymem.backend import TensorSpec, TensorStore
    from pymem.errors import DeviceError

    runner = gg.MultiDeviceRunner([rpc[0]], n_threads=1)
    with TensorStore(rpc[1], [TensorSpec("k", "f32", (4, 8))]) as store, gg.Context() as ctx:
        x = ctx.new_tensor("f32", (4, 2), input=True)
        idx = ctx.new_tensor("i64", (2,), input=True)
        gf = ctx.graph([ctx.set_rows(store["k"].ptr, x, idx)])
        try:
            runner.compute(gf, {x: np.zeros((2, 4), np.float32), idx: np.arange(2)}, [])
        except DeviceError as exc:
            return str(exc)
        finally:
            runner.close()
    return None


# the split replays besides jamba's: K-shift over RoPE'd K and transposed V (llama, no
# flash attention), short-conv rollback planes (lfm2), the iSWA pair (gemma2)
SPLIT_RUNS = (
    "jamba.main.fa1.u0",
    "llama.main.fa0.u1",
    "lfm2.rollback.fa1.u1",
    "gemma2.main.fa0.u1",
)


def split_one(name: str, rpc: list[str], weights: str = "CPU") -> dict[str, Any]:
    """One recorded run replayed over the CPU alone and over layers split across the CPU
    and the servers, the weights on ``weights``; what matched, as JSON-ready values."""
    from replay import Run

    from pymem.runtime.gguf_llama import GGUFModel

    path = RUN.parent / f"{name}.json"
    model = GGUFModel(Run.load(path).model_path(), device=weights)  # one thread
    if name.startswith("jamba"):
        placement = split_placements(rpc)
    else:  # round robin, E.g. 4 layers over [CPU, RPC0, RPC1] -> CPU, RPC0, RPC1, CPU
        where = ["CPU", *rpc]
        placement = {il: where[il % len(where)] for il in range(model.hp.n_layer)}
    cpu, t_cpu = replay_engine(model, None, path)
    split, t_split = replay_engine(model, placement, path)
    runners = {"+".join(k): r.names for k, r in model.runners.split.items()}
    n_splits = [r.n_splits for r in model.runners.split.values()]
    model.close()
    assert len(cpu.logits) == len(split.logits) > 0
    assert [w for w, _ in cpu.blobs] == [w for w, _ in split.blobs]
    return dict(
        placement={str(k): v for k, v in placement.items()},
        weights=weights,
        runners=runners,
        n_splits=n_splits,
        decodes=len(cpu.logits),
        logits_identical=sum(
            bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
            for a, b in zip(cpu.logits, split.logits)
        ),
        logits_max_rel=max(
            float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(cpu.logits, split.logits)
        ),
        blobs=len(cpu.blobs),
        blobs_differing=[w for (w, a), (_, b) in zip(cpu.blobs, split.blobs) if a != b],
        # this ggml build (GGML_NATIVE=OFF) is not the recording's: reported, not asserted
        as_recorded=dict(
            cpu_logits=cpu.logits_as_recorded,
            split_logits=split.logits_as_recorded,
            logits_max_rel_before_seq_div=split.max_rel_to_recording,
        ),
        t_cpu_s=round(t_cpu, 3),
        t_split_s=round(t_split, 3),
    )


def main_split(binary: str, n_servers: int) -> None:
    """Layers split over the CPU and the servers decode as the CPU alone does."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        endpoints = []
        for _ in range(n_servers):
            proc, endpoint = start_server(binary)
            procs.append(proc)
            endpoints.append(endpoint)
        import pymem

        rpc = [pymem.add_rpc_device(e).name for e in endpoints]
        runs = {name: split_one(name, rpc) for name in SPLIT_RUNS}
        if n_servers > 1:  # the weights on a server too, the memory over all three
            runs["jamba.main.fa1.u0@" + rpc[0]] = split_one(SPLIT_RUNS[0], rpc, rpc[0])
        foreign_error = foreign_device_error(rpc) if len(rpc) > 1 else None
        print(json.dumps(dict(devices=rpc, runs=runs, foreign_error=foreign_error)))
    finally:
        for proc in procs:
            stop(proc)


def main_gone(binary: str) -> None:
    """A server that exits between a ubatch's apply and its graph: typed errors from the
    graph, state I/O and sequence ops, a close that does not abort, a normal exit."""
    proc, endpoint = start_server(binary)
    try:
        import pymem
        from pymem.backend import get_device
        from pymem.batch import Batch, BatchAllocator
        from pymem.errors import DeviceError
        from pymem.factory import ContextParams, create_memory
        from pymem.runtime.decoder import step_inputs
        from pymem.runtime.gguf_llama import GGUFModel

        dev = pymem.add_rpc_device(endpoint).name
        spec = pymem.spec_from_gguf(MODEL)
        mem = create_memory(
            spec, ContextParams(n_ctx=64, n_seq_max=N_SEQ, n_batch=32, n_ubatch=16,
                                flash_attn=False, device=split_placements([dev])),
        )  # fmt: skip
        model = GGUFModel(MODEL)
        balloc = BatchAllocator()
        balloc.init(Batch.from_items(prompt(0, 4)), memory=mem, n_seq_max=N_SEQ)
        ctx = mem.init_batch(balloc, 16, False)
        ctx.apply()
        ub = ctx.get_ubatch()
        inputs = step_inputs(ctx, ub, False)
        model.forward(ub, inputs, False)  # the split runner exists and the server answers
        mem.seq_cp(0, 1, -1, -1)  # (bookkeeping only) seq 1 must survive a refused clear
        blob = bytes(mem.state_write())
        blob_seq = bytes(mem.state_write(0))
        stop(proc)
        # the server's exit closes its end at once, but on a loaded machine the kernel may
        # deliver that close to this process's socket a little later (the loopback's
        # softirq work): what is tested is a server whose close has arrived, so wait for it
        link = get_device(dev).rpc_link
        assert link is not None
        deadline = time.monotonic() + 10
        while not link.is_down() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert link.is_down(), "the killed rpc-server's close did not reach this process in 10 s"
        errors: dict[str, str | None] = {}

        def attempt(name: str, call: Any) -> None:
            try:
                call()
                errors[name] = None
            except DeviceError as exc:
                errors[name] = str(exc)

        attempt("forward", lambda: model.forward(ub, inputs, False))
        attempt("state_write", mem.state_write)
        # a restore that fails on the gone server changes nothing: the sequence removed
        # before it stays removed (bookkeeping only: no device call)
        mem.seq_rm(0, -1, -1)
        removed = [mem.seq_pos_min(0), mem.seq_pos_max(0)]
        attempt("state_read", lambda: mem.state_read(blob))
        attempt("state_seq_read", lambda: mem.state_read(blob_seq, 0))
        restore_kept = [mem.seq_pos_min(0), mem.seq_pos_max(0)]
        attempt("clear", lambda: mem.clear(True))
        clear_kept = int(mem.seq_pos_max(1))  # a refused clear(True) empties nothing
        # freeing the server's buffers and the scheduler's would abort inside ggml: close()
        # leaves them unfreed with a warning, and the process exits normally
        mem.close()
        model.close()
        print(
            json.dumps(
                dict(
                    device=dev,
                    errors=errors,
                    removed=removed,
                    restore_kept=restore_kept,
                    clear_kept=clear_kept,
                )
            )
        )
    finally:
        stop(proc)


def tiny_decode(memory_type: str, placement: dict[int, str] | None) -> dict[str, Any]:
    """The tiny runtime model (pymem.runtime.graph.TinyModel, weights on the CPU) over a
    memory whose layers follow ``placement`` (None: all on the CPU): logits, state blob,
    the runners used."""
    from pymem.batch import Batch
    from pymem.factory import ContextParams, create_memory
    from pymem.runtime.decoder import Decoder
    from pymem.runtime.graph import TinyConfig, TinyModel

    cfg = TinyConfig.preset(memory_type)
    model = TinyModel(cfg, "CPU")
    mem = create_memory(
        cfg.spec(),
        ContextParams(n_ctx=64, n_seq_max=N_SEQ, n_ubatch=8, flash_attn=False, type_k="f32",
                      type_v="f32", kv_unified=False, device=placement or "CPU"),
    )  # fmt: skip
    dec = Decoder(model, mem, n_seq_max=N_SEQ, n_ubatch=8)
    logits = [dec.decode(Batch.from_items(items)) for items in TINY_BATCHES]
    mem.seq_rm(1, -1, -1)  # whole: a recurrent sequence cannot be cut in the middle
    logits.append(dec.decode(Batch.from_items(prompt(1, 3, 0, 9))))
    blob = bytes(mem.state_write())
    runners = sorted("+".join(k) for k in model.runners.split)
    mem.close()
    model.close()
    return dict(logits=logits, blob=blob, runners=runners)


TINY_BATCHES = [
    [((5 * i + s) % 50 + 1, i, [s], True) for s in range(N_SEQ) for i in range(5)],
    [((3 * s + 7) % 50 + 1, 5, [s], True) for s in range(N_SEQ)],
]


def main_tiny(binary: str) -> None:
    """TinyModel over memories split across the CPU and a server decodes as the CPU does;
    a one-device runner handed a graph that reaches the server refuses it."""
    proc, endpoint = start_server(binary)
    try:
        import pymem
        import pymem.ggml as gg
        from pymem.errors import DeviceError

        dev = pymem.add_rpc_device(endpoint).name
        out: dict[str, Any] = {"device": dev, "types": {}}
        for memory_type in ("kv", "recurrent", "hybrid"):
            n_layer = len(__import__("pymem.runtime.graph", fromlist=["TinyConfig"])
                          .TinyConfig.preset(memory_type).layers)  # fmt: skip
            placement = {il: (dev if il % 2 else "CPU") for il in range(n_layer)}
            cpu = tiny_decode(memory_type, None)
            split = tiny_decode(memory_type, placement)
            out["types"][memory_type] = dict(
                decodes=len(cpu["logits"]),
                logits_identical=sum(
                    bool(np.array_equal(a, b, equal_nan=True))
                    for a, b in zip(cpu["logits"], split["logits"])
                ),
                state_identical=cpu["blob"] == split["blob"],
                runners_cpu=cpu["runners"],
                runners_split=split["runners"],
            )
        # a graph writing a tensor on the server, handed to the CPU's one-device runner
        from pymem.backend import TensorSpec, TensorStore

        with TensorStore(dev, [TensorSpec("k", "f32", (4, 8))]) as store, gg.Context() as ctx:
            x = ctx.new_tensor("f32", (4, 2), input=True)
            idx = ctx.new_tensor("i64", (2,), input=True)
            stored = ctx.set_rows(store["k"].ptr, x, idx)
            gf = ctx.graph([stored])
            runner = gg.GraphRunner("CPU", n_threads=1)
            try:
                runner.compute(gf, {x: np.ones((2, 4), np.float32), idx: np.array([0, 3])}, [])
                out["one_device_error"] = None
            except DeviceError as exc:
                out["one_device_error"] = str(exc)
            runner.close()
            out["server_tensor_untouched"] = bytes(store["k"].read_bytes()) == bytes(4 * 8 * 4)
        print(json.dumps(out))
    finally:
        stop(proc)


def main() -> None:
    if sys.argv[2] == "engine":
        main_engine(sys.argv[1])
        return
    if sys.argv[2].startswith("split"):
        main_split(sys.argv[1], int(sys.argv[2][5:]))
        return
    if sys.argv[2] == "gone":
        main_gone(sys.argv[1])
        return
    if sys.argv[2] == "tiny":
        main_tiny(sys.argv[1])
        return
    binary, n_servers = sys.argv[1], int(sys.argv[2])
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        endpoints = []
        for _ in range(n_servers):
            proc, endpoint = start_server(binary)
            procs.append(proc)
            endpoints.append(endpoint)
        import pymem
        from pymem.factory import ContextParams, create_memory

        info = pymem.ggml_info()
        assert "RPC" in info.backends, info
        rpc = [pymem.add_rpc_device(e).name for e in endpoints]
        assert [pymem.add_rpc_device(e).name for e in endpoints] == rpc  # idempotent
        names = [d.name for d in pymem.devices()]
        assert all(n in names for n in rpc), names

        spec = pymem.spec_from_gguf(MODEL)
        # jamba's layers: 0 R/S, 1 K/V, 2 R/S, 3 K/V
        where = ["CPU", *rpc]
        placement = {il: where[(il + 1) % len(where)] for il in range(spec.n_layer)}
        common: dict[str, Any] = dict(
            n_ctx=64, n_seq_max=N_SEQ, n_batch=32, n_ubatch=16, flash_attn=False
        )
        split = create_memory(spec, ContextParams(**common, device=placement))
        cpu = create_memory(spec, ContextParams(**common))
        breakdown = split.memory_breakdown()
        assert set(breakdown) == set(placement.values()), breakdown
        assert sum(breakdown.values()) >= sum(cpu.memory_breakdown().values()) > 0

        t1 = time.perf_counter()
        for mem in (split, cpu):
            decode(mem, prompt(0, 7) + prompt(1, 5, tok0=11))
            scribble(mem, seed=1)
            decode(mem, prompt(0, 3, p0=7, tok0=30))
            assert mem.seq_rm(1, -1, -1)
            mem.seq_cp(0, 1, -1, -1)  # copies rows between streams / cells, on the device
            assert mem.seq_rm(1, -1, -1)
            decode(mem, prompt(1, 4, tok0=40))
            mem.seq_add(0, 0, -1, 3)  # a position shift (a K-shift where the layers have RoPE)
            decode(mem, prompt(0, 2, p0=13, tok0=50))
            scribble(mem, seed=2)
        same(snapshot(split), snapshot(cpu), "after the decodes")

        # state round trips: each memory's blob into a fresh memory of the other placement
        blob, blob1 = split.state_write(), split.state_write(1)
        want = snapshot(cpu)
        for src, dst_params in ((blob, common), (bytes(cpu.state_write()), common)):
            fresh = create_memory(spec, ContextParams(**dst_params, device=placement))
            fresh.state_read(src)
            got = snapshot(fresh)
            assert got["state"] == want["state"] and all(
                got[f"state_seq{s}"] == want[f"state_seq{s}"] for s in range(N_SEQ)
            ), "round trip into the split memory"
            fresh.close()
        back = create_memory(spec, ContextParams(**common))
        back.state_read(blob)
        assert bytes(back.state_write()) == want["state"], "split -> CPU round trip"
        split.seq_rm(1, -1, -1)
        cpu.seq_rm(1, -1, -1)
        split.state_read(blob1, 1)
        cpu.state_read(blob1, 1)
        same(snapshot(split), snapshot(cpu), "after a per-sequence round trip")
        t2 = time.perf_counter()
        print(
            json.dumps(
                dict(
                    ggml=info.path,
                    devices={n: pymem.get_device(n).description for n in rpc},
                    placement=placement,
                    breakdown=breakdown,
                    breakdown_cpu=cpu.memory_breakdown(),
                    state_bytes=len(blob),
                    setup_s=round(t1 - t0, 3),
                    ops_s=round(t2 - t1, 3),
                )
            )
        )
        for mem in (split, cpu, back):
            mem.close()
    finally:
        for proc in procs:
            stop(proc)


if __name__ == "__main__":
    main()
