"""``python -m pymem inspect`` / ``convert`` (pymem.runtime.inspect, pymem.runtime.convert).

For every memory type (KV, iSWA, hybrid, hybrid-iSWA, recurrent) and every file kind
(session, sequence file, context blob, raw memory state whole and per sequence, sequence
state buffer, container whole and per sequence): the exact facts (format, arch, tokens,
parts, cells per stream, position ranges, layers with types and row sizes, bytes per
layer) read from the bytes alone, and the same facts from the live memory after restoring
into the model's memory. Damaged files raise StateError (exit 2 on the command line);
convert round trips (extract, merge, container <-> session) keep every byte of every
sequence. With llama-cpp-python installed, a session file llama.cpp itself wrote.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from state_files import CASES, MODELS, PROMPT, decode, filled, make_memory, randomize

from pymem.container import load_container, model_fingerprint, write_container
from pymem.errors import StateError
from pymem.runtime.convert import ConvertInput, convert
from pymem.runtime.inspect import Inspection, format_text, inspect_file, to_json
from pymem.runtime.state_parse import MemoryFacts, parse_memory
from pymem.sessions import (
    context_state,
    load_sequence,
    load_session,
    read_header,
    save_sequence,
    save_session,
    seq_state,
)

ROOT = Path(__file__).resolve().parents[1]
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None

K16 = ("k", "f16", 16, 8, False)
V16 = ("v", "f16", 16, 8, False)
V16T = ("v", "f16", 16, 8, True)
# per model, per part: (name, kind, model layer ids, the tensors of every layer)
PARTS: dict[str, list[tuple[str, str, list[int], tuple]]] = {
    "tiny-llama.gguf": [("kv", "kv", [0, 1], (("k", "f16", 64, 32, False), ("v", "f16", 64, 32, True)))],
    "tiny-gemma2.gguf": [("base", "kv", [1], (K16, V16)), ("swa", "kv", [0], (K16, V16))],
    "tiny-jamba.gguf": [
        ("attention", "kv", [1, 3], (K16, V16T)),
        ("recurrent", "recurrent", [0, 2], (("r", "f32", 384, 96, False), ("s", "f32", 512, 128, False))),
    ],
    "tiny-lfm2-swa.gguf": [
        ("attention", "kv", [], (K16, V16)),
        ("swa", "kv", [1, 3], (K16, V16)),
        ("recurrent", "recurrent", [0, 2], (("r", "f32", 128, 32, False), ("s", "f32", 0, 0, False))),
    ],
    "tiny-mamba.gguf": [
        ("recurrent", "recurrent", [0, 1], (("r", "f32", 384, 96, False), ("s", "f32", 512, 128, False)))
    ],
}  # fmt: skip
N_LAYER = {"tiny-jamba.gguf": 4, "tiny-lfm2-swa.gguf": 4, "tiny-mamba.gguf": 2}
# memory-level (seq_pos_min, seq_pos_max): hybrids answer max(min) / min(max) of their parts
WHOLE_SEQS = {
    "kv_cache": {0: (0, 11), 1: (0, 4)},
    "kv_cache_iswa": {0: (0, 11), 1: (0, 4)},
    "hybrid": {0: (11, 11), 1: (4, 4)},
    "hybrid_iswa": {0: (11, 11), 1: (4, 4)},
    "recurrent": {0: (11, 11), 1: (4, 4)},
}
# KV streams: cells per stream for the whole state and for seq 1 (jamba: one stream per seq)
KV_STREAMS = {
    "whole": {"tiny-jamba.gguf": [12, 5, 0, 0], None: [17]},
    "seq1": {"tiny-jamba.gguf": [0, 5, 0, 0], None: [5]},
}
# the state bytes of the whole memory, worked out field by field. E.g. tiny-llama (one
# stream, 17 cells, 2 layers, V transposed): n_stream 4 + cell_count 4 + 17 cells x 12 +
# v_trans 4 + n_layer 4 + 2 x (K: 12 + 17 x 64) + 2 x (V: 12 + 32 x 17 x 2) = 4620
WHOLE_BYTES = {
    "tiny-llama.gguf": 4620,
    "tiny-gemma2.gguf": 2 * (4 + 4 + 17 * 12 + 8 + (12 + 17 * 16) * 2),  # base, swa: 788 each
    "tiny-jamba.gguf": 4 + (4 + 12 * 12 + 8 + 4 * (12 + 12 * 16))  # n_stream, stream 0
    + (4 + 5 * 12 + 8 + 4 * (12 + 5 * 16)) + 2 * 4  # stream 1, streams 2 and 3
    + (4 + 2 * 12 + 8 + 2 * (12 + 2 * 384) + 2 * (12 + 2 * 512)),  # recurrent
    "tiny-lfm2-swa.gguf": (4 + 4 + 17 * 12 + 8)
    + (4 + 4 + 17 * 12 + 8 + 2 * (12 + 17 * 16) * 2)
    + (4 + 2 * 12 + 8 + 2 * (12 + 2 * 128) + 2 * 12),
    "tiny-mamba.gguf": 4 + 2 * 12 + 8 + 2 * (12 + 2 * 384) + 2 * (12 + 2 * 512),
}  # fmt: skip


def _tensors(facts: MemoryFacts, part: int) -> list[tuple]:
    return [
        tuple((t.name, t.type, t.row_bytes, t.n_embd, t.transposed) for t in la.tensors)
        for la in facts.parts[part].layers
    ]


def check_facts(model: str, facts: MemoryFacts, scope: str, live: bool) -> None:
    """The exact facts of a whole state (``scope`` "whole") or of seq 1 ("seq1")."""
    mtype = CASES[model][1]
    parts = PARTS[model]
    assert facts.type == mtype
    assert facts.alternatives == ()
    assert [(p.name, p.kind) for p in facts.parts] == [(n, k) for n, k, _, _ in parts]
    for i, (name, kind, ils, tensors) in enumerate(parts):
        p = facts.parts[i]
        assert [la.il for la in p.layers] == (ils if live else [None] * len(ils)), name
        assert _tensors(facts, i) == [tensors] * len(ils), name
        if kind == "kv":
            counts = KV_STREAMS[scope].get(model, KV_STREAMS[scope][None])
            assert [s.cell_count for s in p.streams] == counts, name
            assert p.cell_ext == "none"
            want = {0: (0, 11), 1: (0, 4)} if scope == "whole" else {1: (0, 4)}
            got = {q: r for s in p.streams for q, r in s.seqs.items()}
            assert got == want, name
        else:
            assert p.n_layer_total == N_LAYER[model]
            if scope == "whole":
                assert p.cells == ((11, (0,)), (4, (1,)))
                assert p.per_sequence is False
            else:
                # a per-sequence recurrent state stores no seq id; restored, it has one
                assert p.cells == ((4, (facts_seq(facts),) if live else ()),)
                assert p.per_sequence is True
        n = sum(s.cell_count for s in p.streams)
        row = sum(t[2] for t in tensors)
        assert [la.bytes for la in p.layers] == [n * row] * len(ils), name
    if scope == "whole":
        assert facts.seqs == WHOLE_SEQS[mtype]
        assert sum(p.bytes or 0 for p in facts.parts) == WHOLE_BYTES[model]
    elif facts.seqs:
        assert list(facts.seqs) == [facts_seq(facts)]


def facts_seq(facts: MemoryFacts) -> int:
    """The sequence a restored per-sequence state went to (the one in its parts)."""
    ids = {q for p in facts.parts for s in p.streams for q in s.seqs}
    assert len(ids) == 1
    return ids.pop()


def write_files(model: str, d: Path) -> dict[str, Path]:
    """Every file kind, from one filled memory (seq 0: pos 0..11, seq 1: pos 0..4)."""
    arch = CASES[model][0]
    with filled(model) as mem:
        paths = {k: d / f"{model}.{k}" for k in
                 ("session", "sequence", "context", "memory", "memory1", "seqblob", "container", "container1")}  # fmt: skip
        save_session(paths["session"], mem, arch, PROMPT)
        save_sequence(paths["sequence"], mem, 1, PROMPT[:5])
        paths["context"].write_bytes(context_state(mem, arch))
        paths["memory"].write_bytes(mem.state_write())
        paths["memory1"].write_bytes(mem.state_write(1))
        paths["seqblob"].write_bytes(seq_state(mem, 1))
        fp = model_fingerprint(MODELS / model)
        write_container(paths["container"], mem, fingerprint=fp, tokens=PROMPT)
        write_container(paths["container1"], mem, 1, fingerprint=fp, tokens=PROMPT[:5])
    return paths


# kind -> (format, scope reported, which state, tokens, seq id the file names, has arch)
KINDS = {
    "session": ("session", "whole", "whole", PROMPT, None, True),
    "sequence": ("sequence", "sequence", "seq1", PROMPT[:5], None, False),
    "context": ("context", "whole", "whole", None, None, True),
    "memory": ("memory", None, "whole", None, None, False),
    "memory1": ("memory", None, "seq1", None, None, False),
    "seqblob": ("sequence_blob", "sequence", "seq1", None, 1, False),
    "container": ("container", "whole", "whole", PROMPT, None, False),
    "container1": ("container", "sequence", "seq1", PROMPT[:5], 1, False),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("states")
    return {m: write_files(m, d) for m in CASES}


@pytest.mark.parametrize("model", list(CASES))
def test_every_file_kind_from_the_bytes(model: str, files) -> None:
    arch, mtype, _ = CASES[model]
    for kind, (fmt, scope, state, tokens, seq, has_arch) in KINDS.items():
        insp = inspect_file(files[model][kind])
        sf = insp.file
        assert sf.format == fmt, kind
        assert sf.arch == (arch if has_arch else None), kind
        assert (list(sf.tokens) if sf.tokens is not None else None) == tokens, kind
        assert sf.seq_id == seq, kind
        assert insp.memory.source == "bytes"
        check_facts(model, insp.memory, state, live=False)
        # a raw KV state does not say whether it was one sequence; a recurrent part does
        has_rec = mtype in ("recurrent", "hybrid", "hybrid_iswa")
        want = (
            scope or ("whole" if state == "whole" else "sequence")
            if has_rec
            else scope or "unknown"
        )
        assert insp.scope == want, kind
        if fmt == "container":
            assert sf.container is not None
            assert sf.container.fingerprint == model_fingerprint(MODELS / model)
        json.dumps(to_json(insp))  # JSON-ready
        text = format_text(insp)
        assert f"memory       {mtype} (read from the bytes)" in text


@pytest.mark.parametrize("model", list(CASES))
def test_every_file_kind_restored_into_the_model(model: str, files) -> None:
    arch, mtype, opts = CASES[model]
    for kind, (_, _, state, _, _, _) in KINDS.items():
        insp = inspect_file(files[model][kind], MODELS / model)
        assert insp.memory.source == "model"
        check_facts(model, insp.memory, state, live=True)
        m = insp.model
        assert m is not None
        assert (m.arch, m.fingerprint) == (arch, model_fingerprint(MODELS / model))
        # unset context options come from the bytes: n_stream and v_trans
        assert m.context["kv_unified"] == opts.get("kv_unified", False), kind
        if "flash_attn" in opts:
            assert m.context["flash_attn"] == opts["flash_attn"], kind
        if state == "whole" or (kind == "memory1" and mtype in ("kv_cache", "kv_cache_iswa")):
            assert m.restored_seq_id == -1, kind  # a raw KV state restores whole if it can
        else:
            # the sequence the file or its KV cells name; a recurrent-only state names none
            assert m.restored_seq_id == (0 if mtype == "recurrent" and kind != "seqblob" and
                                         kind != "container1" else 1), kind  # fmt: skip
        assert m.memory_breakdown and all(v > 0 for v in m.memory_breakdown.values())
        # the live memory writes exactly the bytes its parts were measured from
        if state == "whole":
            assert sum(p.bytes or 0 for p in insp.memory.parts) == WHOLE_BYTES[model]


def test_cli_text_and_json(files) -> None:
    model = "tiny-jamba.gguf"
    session = files[model]["session"]
    res = _cli("inspect", session)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0] == f"{session}: llama.cpp session file v10, {session.stat().st_size} bytes"
    assert lines[1:] == [
        "  arch         jamba",
        f"  tokens       12 [{', '.join(map(str, PROMPT[:8]))}, ...]",
        f"  state        whole memory, {WHOLE_BYTES[model]} bytes at offset 69, flags 0",
        "  memory       hybrid (read from the bytes), seq 0 pos 11..11, seq 1 pos 4..4",
        "  part attention (kv): 1424 bytes at offset 69, 4 stream(s), 17 cells, 2 layers, cell ext none",
        "    stream 0: 12 cells, seq 0 pos 0..11",
        "    stream 1: 5 cells, seq 1 pos 0..4",
        "    stream 2: 0 cells, no sequences",
        "    stream 3: 0 cells, no sequences",
        "    layer #0     K f16[8] 16 B/cell  V f16[8]^T 16 B/cell  544 B",
        "    layer #1     K f16[8] 16 B/cell  V f16[8]^T 16 B/cell  544 B",
        "  part recurrent (recurrent): 3668 bytes at offset 1493, 2 cells: pos 11 seq 0; pos 4 seq 1, 2 layers of 4",
        "    layer #0     R f32[96] 384 B/cell  S f32[128] 512 B/cell  1792 B",
        "    layer #1     R f32[96] 384 B/cell  S f32[128] 512 B/cell  1792 B",
    ]  # fmt: skip

    res = _cli("inspect", files[model]["container1"], "--model", MODELS / model, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["format"], doc["fingerprint"]) == ("container", model_fingerprint(MODELS / model))
    assert doc["tokens"] == {"count": 5, "ids": PROMPT[:5]}
    assert doc["state"]["scope"] == "sequence" and doc["state"]["seq_id"] == 1
    assert doc["container"]["kind"] == "sequence" and doc["container"]["pos"] == {"1": [4, 4]}
    assert doc["memory"]["type"] == "hybrid" and doc["memory"]["source"] == "model"
    assert doc["memory"]["seqs"] == {"1": [4, 4]}
    attn, rec = doc["memory"]["parts"]
    assert [s["cell_count"] for s in attn["streams"]] == [0, 5, 0, 0]
    assert attn["streams"][1]["seqs"] == {"1": [0, 4]}
    assert [la["il"] for la in attn["layers"]] == [1, 3]
    assert attn["layers"][0]["k"] == {"type": "f16", "row_bytes": 16, "n_embd": 8, "bytes": 80, "transposed": False}  # fmt: skip
    assert attn["layers"][0]["v"]["transposed"] is True
    assert rec["cells"] == [{"pos": 4, "seq_ids": [1]}] and rec["n_layer_total"] == 4
    assert doc["model"]["restored_seq_id"] == 1
    assert doc["model"]["context"] == {"n_ctx": 512, "n_seq_max": 4, "kv_unified": False, "flash_attn": False}  # fmt: skip
    assert sorted(doc["model"]["derived"]) == ["flash_attn", "kv_unified", "n_seq_max"]


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pymem", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_shared_cells_and_an_empty_memory(tmp_path: Path) -> None:
    # cells held by two sequences list both ids (records of different lengths)
    model = "tiny-llama.gguf"
    with filled(model) as mem:
        mem.seq_cp(0, 2, -1, -1)
        facts = parse_memory(mem.state_write())
        assert facts.seqs == {0: (0, 11), 1: (0, 4), 2: (0, 11)}
        assert [s.cell_count for s in facts.parts[0].streams] == [17]
        assert facts.alternatives == ()
    # nothing decoded: the cells say nothing about ext, and there are no layer sections
    with make_memory("tiny-jamba.gguf") as empty:
        facts = parse_memory(empty.state_write())
        attn, rec = facts.parts
        assert facts.type == "hybrid" and facts.seqs == {}
        assert [s.cell_count for s in attn.streams] == [0, 0, 0, 0]
        assert (attn.cell_ext, attn.layers, attn.bytes) == ("n/a", (), 4 + 4 * 4)
        assert (rec.cells, rec.cell_count, len(rec.layers)) == ((), 0, 2)


def test_damaged_files_are_refused(files, tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    session = files[model]["session"].read_bytes()
    container = files[model]["container"].read_bytes()
    bad = tmp_path / "bad"
    head = read_header(session)
    full = inspect_file(files[model]["session"]).memory

    # with the model, every cut through a session file is refused
    for cut in [
        *range(0, head.state_offset + 48, 3),
        *range(head.state_offset + 48, len(session), 53),
    ]:
        bad.write_bytes(session[:cut])
        with pytest.raises(StateError, match="offset"):
            inspect_file(bad, MODELS / model)
    # from the bytes alone a cut exactly at a section boundary can read as a smaller state
    # (e.g. a KV part whose layers lost their V sections): never as the same one
    for cut in [*range(head.state_offset + 64), *range(head.state_offset + 64, len(session), 5)]:
        bad.write_bytes(session[:cut])
        try:
            got = inspect_file(bad).memory
        except StateError as exc:
            assert "offset" in str(exc)
            continue
        assert got != full
    # a container: every cut and every byte flip, checksum and all
    for cut in range(0, len(container), 7):
        bad.write_bytes(container[:cut])
        with pytest.raises(StateError, match=r"offset|truncated"):
            inspect_file(bad)
    for at in range(0, len(container), 11):
        flipped = bytearray(container)
        flipped[at] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(StateError):
            inspect_file(bad, format="container")
    # every candidate's failure is named with its offset
    bad.write_bytes(b"\x07" * 64)
    with pytest.raises(StateError) as info:
        inspect_file(bad)
    msg = str(info.value)
    for t in ("kv_cache:", "kv_cache_iswa:", "recurrent:", "hybrid:", "hybrid_iswa:"):
        assert t in msg
    assert "(offset 0)" in msg

    # on the command line: exit 2, the message on stderr
    flipped = bytearray(container)
    flipped[len(container) // 2] ^= 1
    bad.write_bytes(bytes(flipped))
    res = _cli("inspect", bad)
    assert res.returncode == 2 and res.stdout == ""
    assert f"checksum mismatch: the SHA-256 at offset {len(container) - 32}" in res.stderr
    bad.write_bytes(b"PYMEMSTX" + container[8:])
    res = _cli("inspect", bad, "--format", "container")
    assert res.returncode == 2 and "magic b'PYMEMSTX' at offset 0" in res.stderr
    res = _cli("inspect", files[model]["session"], "--model", MODELS / "tiny-llama.gguf")
    assert res.returncode == 2 and "wrong model arch 'jamba' at offset 60" in res.stderr
    res = _cli("inspect", files[model]["container"], "--model", MODELS / "tiny-mamba.gguf")
    assert res.returncode == 2 and "fingerprint is 'jamba:" in res.stderr


def _canonical(model: str, blob: bytes) -> bytes:
    """A per-sequence state restored into seq 0 of a fresh memory and written again, so
    states of different sequence ids (or streams) compare byte for byte."""
    with make_memory(model) as mem:
        mem.state_read(blob, 0)
        return mem.state_write(0)


@pytest.mark.parametrize("model", list(CASES))
def test_convert_extract_merge_and_container(model: str, files, tmp_path: Path) -> None:
    arch = CASES[model][0]
    gguf = MODELS / model
    session = files[model]["session"]
    with filled(model) as orig:
        seq0, seq1 = orig.state_write(0), orig.state_write(1)
        whole = orig.state_write()

    # extract seq 1 of a whole session into a sequence file; load it into seq 3
    out = tmp_path / "seq1.seq"
    res = convert([ConvertInput(str(session))], out, gguf, seq_id=1)
    assert (res.to, res.seq_id, res.restored) == ("sequence", 1, ((str(session), -1),))
    with make_memory(model) as mem:
        assert load_sequence(out, mem, 3).tolist() == PROMPT
        assert mem.seq_pos_max(3) == 4 and mem.seq_pos_max(1) == -1
        assert _canonical(model, mem.state_write(3)) == _canonical(model, seq1)

    # merge two sequence files into one whole state, each into its own sequence
    a, b = tmp_path / "a.seq", tmp_path / "b.seq"
    with filled(model) as mem:
        save_sequence(a, mem, 0, PROMPT)
        save_sequence(b, mem, 1, PROMPT[:5])
    merged = tmp_path / "merged.session"
    res = convert([ConvertInput(str(a)), ConvertInput(str(b), 1)], merged, gguf)
    assert (res.to, res.seq_id) == ("session", -1)
    assert res.restored == ((str(a), 0), (str(b), 1))
    with make_memory(model) as mem:
        assert load_session(merged, mem, arch).tolist() == PROMPT
        assert mem.state_write(0) == seq0 and mem.state_write(1) == seq1

    # session -> container -> session: the same bytes again
    cont = tmp_path / "whole.pmst"
    convert([ConvertInput(str(session))], cont, gguf, to="container")
    with make_memory(model) as mem:
        header = load_container(cont, mem, fingerprint=model_fingerprint(gguf))
        assert header.kind == "whole" and header.tokens == tuple(PROMPT)
        assert mem.state_write() == whole
    back = tmp_path / "back.session"
    convert([ConvertInput(str(cont))], back, gguf)
    assert back.read_bytes() == session.read_bytes()
    # and blobs: the context blob of the whole memory, a sequence blob of one sequence
    blob = tmp_path / "ctx.bin"
    convert([ConvertInput(str(cont))], blob, gguf, to="blob")
    assert blob.read_bytes() == files[model]["context"].read_bytes()
    convert([ConvertInput(str(cont))], blob, gguf, to="blob", seq_id=1)
    assert blob.read_bytes() == files[model]["seqblob"].read_bytes()


def test_convert_cli_and_refusals(files, tmp_path: Path) -> None:
    model = "tiny-lfm2-swa.gguf"
    gguf = MODELS / model
    seq_file = files[model]["sequence"]
    out = tmp_path / "merged.session"
    res = _cli("convert", files[model]["container1"], out, "--model", gguf, "--as-seq", "2",
               "--merge", seq_file, "--as-seq", "3", "--to", "session")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{out}: session, {out.stat().st_size} bytes, the whole memory (seq 2 pos 4..4, seq 3 pos 4..4)"  # fmt: skip
    facts = inspect_file(out).memory
    assert facts.seqs == {2: (4, 4), 3: (4, 4)}
    assert [p.cell_count for p in facts.parts] == [10, 10, 2]

    # refused: nothing written, exit 2
    refused = tmp_path / "never"
    res = _cli("convert", files[model]["session"], refused, "--model", gguf, "--merge", files[model]["session"])  # fmt: skip
    assert res.returncode == 2 and "holds a whole memory" in res.stderr
    damaged = tmp_path / "damaged.seq"
    damaged.write_bytes(seq_file.read_bytes()[:-3])
    res = _cli("convert", damaged, refused, "--model", gguf)
    assert res.returncode == 2 and "offset" in res.stderr
    with pytest.raises(StateError, match="restores into seq 1 like an earlier input"):
        convert([ConvertInput(str(files[model]["container1"])), ConvertInput(str(seq_file), 1)],
                refused, gguf)  # fmt: skip
    with pytest.raises(StateError, match="sequence 2 holds no cells"):
        convert([ConvertInput(str(files[model]["session"]))], refused, gguf, seq_id=2)
    assert not refused.exists()


def test_library_is_quiet(files, capsys: pytest.CaptureFixture[str]) -> None:
    model = "tiny-gemma2.gguf"
    inspect_file(files[model]["session"], MODELS / model)
    inspect_file(files[model]["container1"])
    assert capsys.readouterr() == ("", "")


needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (the coexist extra)"
)


@needs_llama_cpp
def test_inspect_a_session_llama_cpp_wrote(tmp_path: Path) -> None:
    from test_sessions import PROMPT as REF_PROMPT
    from test_sessions import _Llama, _prompt_items

    model = "tiny-jamba.gguf"
    ref = _Llama(model)  # n_seq_max 2, one KV stream per sequence, V transposed
    try:
        ref.decode(_prompt_items(0))
        ref.save_session(tmp_path / "ref.session")
    finally:
        ref.close()
    path = tmp_path / "ref.session"
    for insp in (inspect_file(path), inspect_file(path, MODELS / model)):
        live = insp.model is not None
        assert (insp.file.format, insp.file.arch, insp.scope) == ("session", "jamba", "whole")
        assert insp.file.tokens == tuple(REF_PROMPT)
        mf = insp.memory
        assert mf.type == "hybrid" and mf.seqs == {0: (11, 11)}
        attn, rec = mf.parts
        assert [s.cell_count for s in attn.streams] == [12, 0]
        assert attn.streams[0].seqs == {0: (0, 11)}
        assert _tensors(mf, 0) == [(K16, V16T)] * 2
        assert [la.bytes for la in attn.layers] == [12 * 32] * 2
        assert rec.cells == ((11, (0,)),) and rec.n_layer_total == 4
        assert (
            _tensors(mf, 1) == [(("r", "f32", 384, 96, False), ("s", "f32", 512, 128, False))] * 2
        )
        assert [la.il for la in attn.layers + rec.layers] == ([1, 3, 0, 2] if live else [None] * 4)
        if live:
            assert insp.model.context == {"n_ctx": 512, "n_seq_max": 2, "kv_unified": False, "flash_attn": False}  # fmt: skip


def test_inspection_is_frozen(files) -> None:
    insp = inspect_file(files["tiny-mamba.gguf"]["sequence"])
    assert isinstance(insp, Inspection)
    with pytest.raises(AttributeError):
        insp.scope = "whole"  # type: ignore[misc]


def test_decode_helper_places_cells() -> None:
    # the fixture memories really hold what the expectations above say
    with make_memory("tiny-llama.gguf") as mem:
        decode(mem, [(1, p, [2], False) for p in range(3)])
        randomize(mem)
        assert (mem.seq_pos_min(2), mem.seq_pos_max(2)) == (0, 2)
