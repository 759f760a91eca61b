"""llama.cpp's session / sequence files and context blobs (pymem.sessions), both directions.

Without llama-cpp-python: pymem's own files round-trip, their headers parse, and every
damaged file (truncations, wrong magic / version / arch / kind, bytes left over) raises a
StateError and leaves the memory byte for byte as it was.

With llama-cpp-python (the ``coexist`` extra): on the tiny GGUF models (KV, iSWA, hybrid,
hybrid-iSWA) llama.cpp decodes a prompt and saves a session file; pymem loads it into the
memory its factory builds for that model, and the GGUF engine's logits for the next token
equal llama.cpp's own continuation; the other way round, a file pymem saved after
decoding the prompt itself is loaded by llama.cpp and continues the same way. Sequence
files likewise, into another sequence id. Logits are compared within LOGIT_RTOL relative
to each row's largest magnitude (tests/test_gguf_llama.py gives the reason: the same ggml
is bound here, but the SSM scan may round its state differently on another CPU); state
bytes written by the same side are compared exactly.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pymem
from pymem.batch import Batch
from pymem.errors import StateError
from pymem.factory import ContextParams, create_memory
from pymem.memory import Memory
from pymem.runtime.decoder import Decoder
from pymem.runtime.gguf_llama import GGUFModel
from pymem.sessions import (
    SEQ_MAGIC,
    SESSION_MAGIC,
    context_state,
    load_context_state,
    load_seq_state,
    load_sequence,
    load_session,
    read_header,
    save_sequence,
    save_session,
    seq_state,
)

MODELS = Path(__file__).parent / "data" / "models"
LOGIT_RTOL = 1e-3
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None

# model -> (arch, context parameters shared by both sides)
CASES = {
    "tiny-llama.gguf": ("llama", dict(n_ctx=256, flash_attn=False, kv_unified=True)),
    "tiny-gemma2.gguf": ("gemma2", dict(n_ctx=512, flash_attn=True, kv_unified=True)),
    "tiny-jamba.gguf": ("jamba", dict(n_ctx=256, flash_attn=False, kv_unified=False)),
    "tiny-lfm2-swa.gguf": ("lfm2", dict(n_ctx=512, flash_attn=True, kv_unified=True)),
}
N_SEQ = 2
PROMPT = [(7 * i + 3) % 60 + 1 for i in range(12)]
NEXT = 9


def _params(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        n_seq_max=N_SEQ, n_batch=64, n_ubatch=64, swa_full=True, n_rs_seq=0,
        type_k="f16", type_v="f16", **cfg,
    )  # fmt: skip


def _memory(model: str) -> Memory:
    spec = pymem.spec_from_gguf(MODELS / model)
    mem = create_memory(spec, ContextParams(**_params(CASES[model][1])))
    assert mem is not None
    return mem


def _decode(engine: GGUFModel, mem: Memory, items: list, flash_attn: bool) -> np.ndarray:
    """Decode ``items`` ((token, pos, [seq], output)) with the GGUF engine; the output rows."""
    dec = Decoder(engine, mem, n_seq_max=N_SEQ, n_ubatch=64, flash_attn=flash_attn)
    logits = dec.decode(Batch.from_items(items))
    return logits[[i for i, it in enumerate(items) if it[3]]]


def _prompt_items(seq: int) -> list:
    return [(t, p, [seq], p == len(PROMPT) - 1) for p, t in enumerate(PROMPT)]


def _close(got: np.ndarray, want: np.ndarray) -> None:
    scale = np.abs(want).max(axis=-1, keepdims=True)
    rel = float((np.abs(got - want) / scale).max())
    assert rel <= LOGIT_RTOL, f"logits differ by {rel:.3g} relative (> {LOGIT_RTOL})"


@pytest.fixture(scope="module")
def engines():
    cache: dict[str, GGUFModel] = {}
    yield lambda model: cache.setdefault(model, GGUFModel(MODELS / model))
    for e in cache.values():
        e.close()


# --- pymem's own files ---------------------------------------------------------------------


@pytest.mark.parametrize("model", list(CASES))
def test_session_and_sequence_files_round_trip(model: str, engines, tmp_path: Path) -> None:
    arch, cfg = CASES[model]
    engine = engines(model)
    with _memory(model) as mem, _memory(model) as other:
        _decode(engine, mem, _prompt_items(0), cfg["flash_attn"])
        n = save_session(tmp_path / "s.bin", mem, arch, PROMPT)
        data = (tmp_path / "s.bin").read_bytes()
        assert n == len(data)
        head = read_header(data)
        assert (head.kind, head.version, head.tokens.tolist()) == ("session", 10, PROMPT)
        assert data[head.state_offset :] == context_state(mem, arch)
        assert load_session(tmp_path / "s.bin", other, arch).tolist() == PROMPT
        assert other.state_write() == mem.state_write()

        n = save_sequence(tmp_path / "q.bin", mem, 0, PROMPT[:5])
        head = read_header((tmp_path / "q.bin").read_bytes())
        assert (head.kind, head.version, head.tokens.tolist()) == ("sequence", 3, PROMPT[:5])
        other.clear()
        assert load_sequence(tmp_path / "q.bin", other, 0).tolist() == PROMPT[:5]
        assert other.state_write(0) == mem.state_write(0)
        other.clear()
        load_sequence(tmp_path / "q.bin", other, 1)  # into another sequence id
        assert other.seq_pos_max(1) == mem.seq_pos_max(0) == len(PROMPT) - 1
        assert other.seq_pos_max(0) == -1

        blob = context_state(mem, arch)
        other.clear()
        assert load_context_state(other, blob, arch) == len(blob)
        assert other.state_write() == mem.state_write()


def test_damaged_files_change_nothing(engines, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    arch, cfg = CASES[model]
    with _memory(model) as mem, _memory(model) as target:
        _decode(engines(model), mem, _prompt_items(0), cfg["flash_attn"])
        _decode(engines(model), target, _prompt_items(1)[:5], cfg["flash_attn"])
        before = target.state_write()
        save_session(tmp_path / "s.bin", mem, arch, PROMPT)
        save_sequence(tmp_path / "q.bin", mem, 0, PROMPT)
        session = (tmp_path / "s.bin").read_bytes()
        sequence = (tmp_path / "q.bin").read_bytes()
        bad = tmp_path / "bad.bin"

        def refused(data: bytes, load: Any, match: str | None = None) -> None:
            bad.write_bytes(data)
            with pytest.raises(StateError, match=match):
                load(bad)
            assert target.state_write() == before

        def as_session(p: Path) -> Any:
            return load_session(p, target, arch)

        def as_sequence(p: Path) -> Any:
            return load_sequence(p, target, 1)

        head = read_header(session)
        # every cut through the header, the arch name and the first state fields, and a
        # spread of cuts through the rest
        cuts = list(range(head.state_offset + 40)) + list(
            range(head.state_offset + 40, len(session), 97)
        )
        for cut in cuts:
            refused(session[:cut], as_session)
        for cut in range(0, len(sequence), 53):
            refused(sequence[:cut], as_sequence)
        refused(b"xxxx" + session[4:], as_session, "magic")
        refused(session[:4] + (9).to_bytes(4, "little") + session[8:], as_session, "version 9")
        refused(session + b"\0", as_session, "left after the state")
        refused(sequence, as_session, "a sequence file, expected a session file")
        refused(session, as_sequence, "a session file, expected a sequence file")
        with pytest.raises(StateError, match="wrong model arch 'jamba'"):
            load_session(tmp_path / "s.bin", target, "llama")
        assert target.state_write() == before
        assert int.from_bytes(session[:4], "little") == SESSION_MAGIC
        assert int.from_bytes(sequence[:4], "little") == SEQ_MAGIC


# --- llama.cpp's files, both directions --------------------------------------------------


class _Llama:
    """llama.cpp through llama-cpp-python's low-level API: one context, one thread."""

    def __init__(self, model: str) -> None:
        import llama_cpp.llama_cpp as lc

        self.lc = lc
        lc.llama_log_set(_QUIET, None)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(MODELS / model).encode(), mp)
        cp = _params(CASES[model][1])
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.n_batch, p.n_ubatch = (
            cp["n_ctx"], cp["n_seq_max"], cp["n_batch"], cp["n_ubatch"],
        )  # fmt: skip
        p.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if cp["flash_attn"] else 0
        p.kv_unified, p.swa_full, p.n_threads, p.n_threads_batch = cp["kv_unified"], True, 1, 1
        p.offload_kqv = False
        self.ctx = lc.llama_init_from_model(self.model, p)
        assert self.ctx, "llama.cpp could not create the context"
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def decode(self, items: list) -> np.ndarray:
        lc = self.lc
        b = lc.llama_batch_init(len(items), 0, N_SEQ)
        try:
            b.n_tokens = len(items)
            for i, (tok, pos, seqs, out) in enumerate(items):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), out
                for k, s in enumerate(seqs):
                    b.seq_id[i][k] = s
            assert lc.llama_decode(self.ctx, b) == 0
        finally:
            lc.llama_batch_free(b)
        rows = [
            np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), (self.n_vocab,)).copy()
            for i, it in enumerate(items)
            if it[3]
        ]
        return np.stack(rows)

    def save_session(self, path: Path) -> None:
        toks = (self.lc.llama_token * len(PROMPT))(*PROMPT)
        assert self.lc.llama_state_save_file(self.ctx, str(path).encode(), toks, len(PROMPT))

    def load_session(self, path: Path) -> list[int]:
        toks = (self.lc.llama_token * 64)()
        n = ctypes.c_size_t(0)
        ok = self.lc.llama_state_load_file(self.ctx, str(path).encode(), toks, 64, ctypes.byref(n))
        assert ok, "llama.cpp refused the session file"
        return list(toks[: n.value])

    def save_sequence(self, path: Path, seq: int) -> None:
        toks = (self.lc.llama_token * len(PROMPT))(*PROMPT)
        assert self.lc.llama_state_seq_save_file(
            self.ctx, str(path).encode(), seq, toks, len(PROMPT)
        )

    def load_sequence(self, path: Path, seq: int) -> list[int]:
        toks = (self.lc.llama_token * 64)()
        n = ctypes.c_size_t(0)
        got = self.lc.llama_state_seq_load_file(
            self.ctx, str(path).encode(), seq, toks, 64, ctypes.byref(n)
        )
        assert got > 0, "llama.cpp refused the sequence file"
        return list(toks[: n.value])

    def seq_state(self, seq: int) -> bytes:
        n = self.lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        assert self.lc.llama_state_seq_get_data(self.ctx, buf, n, seq) == n
        return bytes(buf)

    def load_seq_state(self, data: bytes, seq: int) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        assert self.lc.llama_state_seq_set_data(self.ctx, buf, len(data), seq) == len(data)

    def state(self) -> bytes:
        n = self.lc.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * n)()
        assert self.lc.llama_state_get_data(self.ctx, buf, n) == n
        return bytes(buf)

    def close(self) -> None:
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


# llama.cpp logs through this callback (kept alive for the process): silence
_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
    lambda level, text, user: None
)

needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (the coexist extra)"
)


@needs_llama_cpp
@pytest.mark.parametrize("model", list(CASES))
def test_llama_cpp_session_continues_in_pymem(model: str, engines, tmp_path: Path) -> None:
    arch, cfg = CASES[model]
    ref = _Llama(model)
    try:
        ref.decode(_prompt_items(0))
        ref.save_session(tmp_path / "ref.session")
        ref_blob = ref.state()
        want = ref.decode([(NEXT, len(PROMPT), [0], True)])
    finally:
        ref.close()
    with _memory(model) as mem:
        assert load_session(tmp_path / "ref.session", mem, arch).tolist() == PROMPT
        # the restored memory writes llama.cpp's bytes back exactly
        assert context_state(mem, arch) == ref_blob
        got = _decode(engines(model), mem, [(NEXT, len(PROMPT), [0], True)], cfg["flash_attn"])
    _close(got, want)


@needs_llama_cpp
@pytest.mark.parametrize("model", list(CASES))
def test_pymem_session_continues_in_llama_cpp(model: str, engines, tmp_path: Path) -> None:
    arch, cfg = CASES[model]
    engine = engines(model)
    with _memory(model) as mem:
        _decode(engine, mem, _prompt_items(0), cfg["flash_attn"])
        save_session(tmp_path / "pm.session", mem, arch, PROMPT)
        want = _decode(engine, mem, [(NEXT, len(PROMPT), [0], True)], cfg["flash_attn"])
    ref = _Llama(model)
    try:
        assert ref.load_session(tmp_path / "pm.session") == PROMPT
        got = ref.decode([(NEXT, len(PROMPT), [0], True)])
    finally:
        ref.close()
    _close(got, want)


@needs_llama_cpp
@pytest.mark.parametrize("model", list(CASES))
def test_sequence_files_cross_both_ways(model: str, engines, tmp_path: Path) -> None:
    cfg = CASES[model][1]
    engine = engines(model)
    ref = _Llama(model)
    try:
        ref.decode(_prompt_items(0))
        ref.save_sequence(tmp_path / "ref.seq", 0)
        want = ref.decode([(NEXT, len(PROMPT), [0], True)])
    finally:
        ref.close()
    with _memory(model) as mem:
        # llama.cpp's sequence 0 continues as pymem's sequence 1
        assert load_sequence(tmp_path / "ref.seq", mem, 1).tolist() == PROMPT
        got = _decode(engine, mem, [(NEXT, len(PROMPT), [1], True)], cfg["flash_attn"])
        _close(got, want)
        save_sequence(tmp_path / "pm.seq", mem, 1, PROMPT)
    ref = _Llama(model)
    try:
        # and pymem's sequence 1 (one token further) continues as llama.cpp's sequence 0
        assert ref.load_sequence(tmp_path / "pm.seq", 0) == PROMPT
        got2 = ref.decode([(NEXT + 1, len(PROMPT) + 1, [0], True)])
    finally:
        ref.close()
    with _memory(model) as mem:
        load_sequence(tmp_path / "pm.seq", mem, 0)
        want2 = _decode(engine, mem, [(NEXT + 1, len(PROMPT) + 1, [0], True)], cfg["flash_attn"])
    _close(got2, want2)


@needs_llama_cpp
@pytest.mark.parametrize("model", list(CASES))
def test_sequence_blobs_cross_both_ways(model: str, engines, tmp_path: Path) -> None:
    """``llama_state_seq_get_data`` blobs (magic, source seq id, state) both ways."""
    cfg = CASES[model][1]
    engine = engines(model)
    ref = _Llama(model)
    try:
        ref.decode(_prompt_items(0))
        blob = ref.seq_state(0)
        want = ref.decode([(NEXT, len(PROMPT), [0], True)])
    finally:
        ref.close()
    with _memory(model) as mem:
        assert load_seq_state(mem, blob, 1) == len(blob)
        assert mem.seq_pos_max(0) == -1 and mem.seq_pos_max(1) == len(PROMPT) - 1
        got = _decode(engine, mem, [(NEXT, len(PROMPT), [1], True)], cfg["flash_attn"])
        _close(got, want)
        mine = seq_state(mem, 1)
    ref = _Llama(model)
    try:
        ref.load_seq_state(mine, 0)
        back = ref.seq_state(0)
    finally:
        ref.close()
    with _memory(model) as mem:
        load_seq_state(mem, mine, 0)
        assert seq_state(mem, 0) == back  # both hold the same sequence 0, byte for byte
