"""pymem's state container (pymem.container): layout, round trips, and refusals.

A container is magic | u32 version | u32 header length | JSON header | the state bytes
exactly as ``mem.state_write`` gives them | SHA-256 of everything before. These tests pin
the layout byte for byte, restore whole and per-sequence containers of every memory type,
and require every damaged or foreign container (truncations at every prefix/header offset
and a spread through the payload, byte flips anywhere, wrong magic or version, a foreign
fingerprint or memory layout, a whole container into one sequence) to raise StateError
naming the offset or field, and to leave the target memory byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from pathlib import Path

import pytest
from state_files import CASES, MODELS, PROMPT, filled, make_memory

from pymem.container import (
    DIGEST_SIZE,
    MAGIC,
    load_container,
    memory_layout,
    model_fingerprint,
    parse_container,
    read_container,
    write_container,
)
from pymem.errors import ConfigError, StateError

LAYOUTS = {
    "tiny-llama.gguf": ("kv_cache", [("kv", "kv", [0, 1])]),
    "tiny-gemma2.gguf": ("kv_cache_iswa", [("base", "kv", [1]), ("swa", "kv", [0])]),
    "tiny-jamba.gguf": (
        "hybrid",
        [("attention", "kv", [1, 3]), ("recurrent", "recurrent", [0, 2])],
    ),
    "tiny-lfm2-swa.gguf": (
        "hybrid_iswa",
        [("attention", "kv", []), ("swa", "kv", [1, 3]), ("recurrent", "recurrent", [0, 2])],
    ),
    "tiny-mamba.gguf": ("recurrent", [("recurrent", "recurrent", [0, 1])]),
}
# (seq_pos_min, seq_pos_max) of seq 0 / seq 1 as each memory type reports them: a hybrid
# answers with max(min) / min(max) of its parts, the recurrent part holds only the last pos
RANGES = {
    "kv_cache": {0: (0, 11), 1: (0, 4)},
    "kv_cache_iswa": {0: (0, 11), 1: (0, 4)},
    "hybrid": {0: (11, 11), 1: (4, 4)},
    "hybrid_iswa": {0: (11, 11), 1: (4, 4)},
    "recurrent": {0: (11, 11), 1: (4, 4)},
}


@pytest.fixture(scope="module")
def fingerprints() -> dict[str, str]:
    return {m: model_fingerprint(MODELS / m) for m in CASES}


def test_model_fingerprint(fingerprints: dict[str, str]) -> None:
    for model, fp in fingerprints.items():
        arch, digest = fp.split(":")
        assert arch == CASES[model][0]
        assert re.fullmatch(r"[0-9a-f]{32}", digest)
        assert model_fingerprint(MODELS / model) == fp  # deterministic
    assert len(set(fingerprints.values())) == len(CASES)
    # same architecture, another file: another fingerprint
    assert model_fingerprint(MODELS / "tiny-llama-e8.gguf") != fingerprints["tiny-llama.gguf"]
    with pytest.raises(ConfigError, match="cannot read GGUF"):
        model_fingerprint(MODELS / "missing.gguf")


@pytest.mark.parametrize("model", list(CASES))
def test_layout_and_round_trip(model: str, fingerprints: dict[str, str], tmp_path: Path) -> None:
    fp = fingerprints[model]
    mtype, parts = LAYOUTS[model]
    with filled(model) as mem, make_memory(model) as other:
        path = tmp_path / "whole.pmst"
        n = write_container(path, mem, fingerprint=fp, tokens=PROMPT)
        data = path.read_bytes()
        assert n == len(data)
        # the byte layout: magic, version, header length, header, payload, SHA-256
        magic, version, n_header = struct.unpack_from("<8sII", data)
        assert (magic, version) == (b"PYMEMST\0", 1)
        doc = json.loads(data[16 : 16 + n_header])
        payload = mem.state_write()
        assert doc["payload_len"] == len(payload)
        assert data[16 + n_header : -DIGEST_SIZE] == payload
        assert data[-DIGEST_SIZE:] == hashlib.sha256(data[:-DIGEST_SIZE]).digest()
        assert len(data) == 16 + n_header + len(payload) + DIGEST_SIZE
        assert (doc["kind"], doc["seq_id"], doc["flags"], doc["fingerprint"]) == (
            "whole",
            -1,
            0,
            fp,
        )
        assert (doc["n_tokens"], doc["tokens"]) == (12, PROMPT)
        assert doc["pos"] == {str(s): list(r) for s, r in RANGES[mtype].items()}
        assert doc["memory"]["type"] == mtype
        assert [(p["name"], p["kind"], p["layers"]) for p in doc["memory"]["parts"]] == parts
        assert doc["memory"] == memory_layout(mem)

        header, view = read_container(path)
        assert bytes(view) == payload
        assert header.payload_offset == 16 + n_header
        assert header.tokens == tuple(PROMPT)
        assert header.pos == RANGES[mtype]

        # whole: restores the whole memory exactly
        assert load_container(path, other, fingerprint=fp) == header
        assert other.state_write() == payload

        # one sequence: header names it, restores into it or another id
        seq_path = tmp_path / "seq1.pmst"
        write_container(seq_path, mem, 1, fingerprint=fp, tokens=PROMPT[:5])
        h1, v1 = read_container(seq_path)
        assert (h1.kind, h1.seq_id, h1.n_tokens, h1.pos) == (
            "sequence",
            1,
            5,
            {1: RANGES[mtype][1]},
        )
        assert bytes(v1) == mem.state_write(1)
        other.clear()
        load_container(seq_path, other)
        assert other.state_write(1) == mem.state_write(1)
        other.clear()
        load_container(seq_path, other, 3)
        assert other.seq_pos_max(3) == mem.seq_pos_max(1)
        assert other.seq_pos_max(1) == -1

        # a file object gets the same bytes
        buf = io.BytesIO()
        assert write_container(buf, mem, fingerprint=fp, tokens=PROMPT) == len(data)
        assert buf.getvalue() == data


def test_partial_only_flags_round_trip(fingerprints: dict[str, str], tmp_path: Path) -> None:
    # PARTIAL_ONLY (1): an iSWA writes only its SWA cache, a hybrid only its recurrent part
    for model, part in (("tiny-gemma2.gguf", "swa"), ("tiny-jamba.gguf", "recurrent")):
        with filled(model) as mem, make_memory(model) as other:
            path = tmp_path / f"{model}.pmst"
            write_container(path, mem, 0, 1, fingerprint=fingerprints[model])
            header, view = read_container(path)
            assert header.flags == 1
            assert bytes(view) == mem.state_write(0, 1)
            load_container(path, other)
            assert other.state_write(0, 1) == mem.state_write(0, 1)
            load_container(path, other, 2)  # only the partial part holds seq 2 now
            assert other.parts()[part].seq_pos_max(2) == 11


def test_damaged_containers_change_nothing(fingerprints: dict[str, str], tmp_path: Path) -> None:
    model = "tiny-jamba.gguf"
    fp = fingerprints[model]
    with filled(model) as mem, filled(model, seed=1) as target:
        target.seq_rm(0, 6, -1)
        before = target.state_write()
        path = tmp_path / "good.pmst"
        write_container(path, mem, fingerprint=fp, tokens=PROMPT)
        good = path.read_bytes()
        n_header = struct.unpack_from("<I", good, 12)[0]
        payload_at = 16 + n_header
        bad = tmp_path / "bad.pmst"

        def refused(data: bytes, match: str, **kw) -> None:
            bad.write_bytes(data)
            with pytest.raises(StateError, match=match):
                load_container(bad, target, **kw)
            assert target.state_write() == before

        # truncations: every offset through the prefix and header, a spread through the
        # payload, and every offset through the checksum
        cuts = [*range(payload_at + 8), *range(payload_at + 8, len(good), 61)]
        cuts += range(len(good) - DIGEST_SIZE, len(good))
        for cut in cuts:
            refused(good[:cut], r"offset|truncated|payload_len|field")
        refused(good[:10], "truncated inside the 16-byte prefix")
        refused(good[:-1], "truncated")
        refused(good + b"\0", "bytes after the checksum")
        # byte flips: in the payload and checksum they are caught by the SHA-256 (named
        # with its offset), in the header by the JSON or field checks or the checksum
        body = len(good) - DIGEST_SIZE
        for at in [*range(payload_at, body, 37), *range(body, len(good), 5)]:
            flipped = bytearray(good)
            flipped[at] ^= 0x40
            refused(bytes(flipped), f"checksum mismatch: the SHA-256 at offset {body}")
        for at in range(16, payload_at, 7):
            flipped = bytearray(good)
            flipped[at] ^= 0x01
            refused(bytes(flipped), r"container")
        refused(b"PYMEMSTX" + good[8:], r"magic b'PYMEMSTX' at offset 0")
        refused(good[:8] + struct.pack("<I", 2) + good[12:], "format version 2 at offset 8")
        refused(
            good[:12] + struct.pack("<I", 1 << 20) + good[16:], "header length 1048576 at offset 12"
        )
        assert good[:8] == MAGIC

        # a well-formed container the memory must refuse
        with pytest.raises(StateError, match="field fingerprint is 'jamba:"):
            load_container(path, target, fingerprint=fingerprints["tiny-mamba.gguf"])
        with pytest.raises(StateError, match="restores with seq_id -1, not 3"):
            load_container(path, target, 3)
        with (
            make_memory("tiny-mamba.gguf") as mamba,
            pytest.raises(StateError, match=r"memory.type 'hybrid', this memory is 'recurrent'"),
        ):
            load_container(path, mamba)
        assert target.state_write() == before
        # after all of that the good one still loads
        load_container(path, target, fingerprint=fp)
        assert target.state_write() == mem.state_write()


def test_layout_mismatch_names_the_field(fingerprints: dict[str, str], tmp_path: Path) -> None:
    from pymem.factory import ContextParams, create_memory
    from pymem.gguf_spec import spec_from_gguf

    model = "tiny-llama.gguf"
    with filled(model) as mem:
        path = tmp_path / "c.pmst"
        write_container(path, mem, fingerprint=fingerprints[model])
    spec = spec_from_gguf(MODELS / model)
    with create_memory(
        spec, ContextParams(n_ctx=256, n_seq_max=4, flash_attn=True, kv_unified=True)
    ) as fa:
        before = fa.state_write()
        with pytest.raises(
            StateError, match=r"memory.parts\[0\].v_trans is True, this memory has False"
        ):
            load_container(path, fa)
        assert fa.state_write() == before


def test_parse_container_checks_header_fields() -> None:
    def build(doc: dict, payload: bytes = b"") -> bytes:
        text = json.dumps(doc).encode()
        head = struct.pack("<8sII", MAGIC, 1, len(text)) + text + payload
        return head + hashlib.sha256(head).digest()

    ok = dict(kind="whole", seq_id=-1, flags=0, fingerprint="x:0", memory={}, pos={},
              n_tokens=1, tokens=[5], payload_len=2)  # fmt: skip
    header, payload = parse_container(build(ok, b"ab"))
    assert (header.tokens, bytes(payload), header.payload_offset) == (
        (5,),
        b"ab",
        16 + len(json.dumps(ok)),
    )
    for key, value, match in [
        ("kind", "all", "kind 'all'"),
        ("seq_id", 2, "seq_id 2 does not fit kind 'whole'"),
        ("n_tokens", 3, "n_tokens 3 and tokens"),
        ("flags", "0", "field 'flags' has the wrong type"),
        ("payload_len", 5, "payload_len 5 .* truncated"),
    ]:
        with pytest.raises(StateError, match=match):
            parse_container(build({**ok, key: value}, b"ab"))
    del ok["fingerprint"]
    with pytest.raises(StateError, match="field 'fingerprint' is missing"):
        parse_container(build(ok, b"ab"))
    text = b"{not json"
    head = struct.pack("<8sII", MAGIC, 1, len(text)) + text
    with pytest.raises(StateError, match="header at offset 16: not UTF-8 JSON"):
        parse_container(head + hashlib.sha256(head).digest())


def test_write_to_a_path_is_atomic(
    fingerprints: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "tiny-llama.gguf"
    path = tmp_path / "c.pmst"
    path.write_bytes(b"old")
    with filled(model) as mem:

        def disk_full(f, seq_id=-1, flags=0):
            f.write(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(mem, "state_write_to", disk_full)
        with pytest.raises(OSError, match="No space"):
            write_container(path, mem, fingerprint=fingerprints[model])
        monkeypatch.undo()
        assert path.read_bytes() == b"old"  # a failed write leaves what was there
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pmst"]
        with pytest.raises(ConfigError, match="fingerprint"):
            write_container(path, mem, fingerprint="")
