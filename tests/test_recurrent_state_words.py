"""The recurrent state writer's numpy helpers against plain-Python readings of the
format: META words of a whole-state blob (``pos, n_seq_id, ids ascending`` per cell, in
cell order; a per-sequence blob has ``pos, 0``) and the runs of consecutive rows its
tensor sections gather. Random cell states, with and without cells shared by several
sequences (the one-sequence-per-cell states take a shortcut that must agree)."""

from __future__ import annotations

import numpy as np
import pytest

from pymem.recurrent import state_io as rs
from pymem.recurrent.cells import RecurrentCells


def _cells(rng: np.random.Generator, size: int, shared: bool) -> RecurrentCells:
    c = RecurrentCells(size, size)
    n_seq = int(rng.integers(0, size + 1))
    if shared:
        tail = rng.integers(-1, size, size)  # any cell, several sequences may share one
    else:
        tail = np.full(size, -1)
        tail[rng.permutation(size)[:n_seq]] = rng.permutation(size)[:n_seq]
    c.tail[:] = tail
    held = np.unique(tail[tail >= 0])
    c.pos[held] = rng.integers(-5, 1 << 20, held.size)
    return c


def _meta_reference(c: RecurrentCells, cells: np.ndarray, seq_id: int) -> list[int]:
    words: list[int] = []
    for cell in cells.tolist():
        if seq_id != -1:
            words += [int(c.pos[cell]), 0]
            continue
        ids = [s for s in range(c.size) if c.tail[s] == cell]
        words += [int(c.pos[cell]), len(ids), *ids]
    return words


def _runs_reference(rows: list[int]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for r in rows:
        if ends and r == ends[-1]:
            ends[-1] += 1
        else:
            starts.append(r)
            ends.append(r + 1)
    return starts, ends


@pytest.mark.parametrize("shared", [False, True])
def test_meta_words_and_runs_read_as_the_format_says(shared: bool) -> None:
    rng = np.random.default_rng(7 + shared)
    fast_path = 0
    for _ in range(300):
        size = int(rng.integers(1, 24))
        c = _cells(rng, size, shared)
        cells, rows = rs.select_rows(c, -1, 0)
        assert cells.tolist() == sorted(set(c.tail[c.tail >= 0].tolist()))
        got = rs.meta_words(c, cells, -1)
        assert got.dtype == np.int32
        assert got.tolist() == _meta_reference(c, cells, -1)
        fast_path += cells.size == np.count_nonzero(c.tail >= 0)
        s = int(rng.integers(0, size))
        one, _ = rs.select_rows(c, s, 0)
        assert rs.meta_words(c, one, s).tolist() == _meta_reference(c, one, s)
        shuffled = rng.permutation(size)[: int(rng.integers(0, size + 1))]
        for probe in (rows, shuffled, np.sort(shuffled)):
            starts, ends = rs._runs(probe)
            assert (starts.tolist(), ends.tolist()) == _runs_reference(probe.tolist())
            assert starts.dtype == ends.dtype == np.int64
    # both roads taken: every state one sequence per cell, or mostly shared cells
    assert fast_path == 300 if not shared else 0 < fast_path < 250
