"""Long state transfers report progress: ``progress(done, total)`` while streaming to and
from files (Memory.state_write_to / state_read_from, pymem.sessions)."""

from __future__ import annotations

import io
from pathlib import Path

from pymem import Batch, BatchAllocator, ContextParams, LayerSpec, ModelSpec, create_memory
from pymem.sessions import load_session, save_session
from pymem.state import PROGRESS_STEP


def _filled(n_tokens: int = 2048):
    spec = ModelSpec(layers=(LayerSpec.attention(n_head_kv=8, head_dim=128),) * 4)
    mem = create_memory(
        spec,
        ContextParams(n_ctx=4096, n_seq_max=1, n_ubatch=512, type_k="f32", type_v="f32"),
    )
    balloc = BatchAllocator()
    balloc.init(
        Batch.from_items([(1, p, [0], False) for p in range(n_tokens)]), memory=mem, n_seq_max=1
    )
    ctx = mem.init_batch(balloc, 512, False)
    while True:
        ctx.apply()
        if not ctx.next():
            break
    return mem


def _check_reports(calls: list[tuple[int, int]], n_bytes: int) -> None:
    assert len(calls) >= n_bytes // PROGRESS_STEP  # one about every PROGRESS_STEP bytes
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and calls[-1] == (n_bytes, n_bytes)
    assert all(t == n_bytes for _, t in calls)


def test_state_write_to_and_read_from_report_progress() -> None:
    with _filled() as mem:
        calls: list[tuple[int, int]] = []
        buf = io.BytesIO()
        n = mem.state_write_to(buf, progress=lambda d, t: calls.append((d, t)))
        assert n > 3 * PROGRESS_STEP  # 64 MiB of K/V: several reports
        _check_reports(calls, n)
        assert buf.getvalue() == mem.state_write()

        calls.clear()
        buf.seek(0)
        before = mem.state_write()
        mem.clear()
        assert mem.state_read_from(buf, progress=lambda d, t: calls.append((d, t))) == n
        _check_reports(calls, n)
        assert mem.state_write() == before


def test_session_files_report_progress(tmp_path: Path) -> None:
    with _filled() as mem:
        writes: list[tuple[int, int]] = []
        save_session(
            tmp_path / "s.bin", mem, "llama", [1, 2, 3], progress=lambda d, t: writes.append((d, t))
        )
        assert writes and writes[-1][0] == writes[-1][1] == len(mem.state_write())
        reads: list[tuple[int, int]] = []
        size = (tmp_path / "s.bin").stat().st_size
        load_session(tmp_path / "s.bin", mem, "llama", progress=lambda d, t: reads.append((d, t)))
        _check_reports(reads, size)
