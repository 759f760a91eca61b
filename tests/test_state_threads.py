"""``pymem.set_state_threads``: a native KV state write or restore split between threads
moves the same bytes as one thread, for one sequence and the whole cache, V in rows and
transposed, unified and with streams, at every thread count (shares of whole pieces: more
threads than pieces, pieces of unequal size); the default resolves to min(4, CPUs) from
1 MiB on; bad settings are refused with nothing changed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from test_kv_state import CFGS, build, randomize
from test_kv_state_paths import _interleaved

import pymem
from pymem.errors import ConfigError
from pymem.kv import KVCache
from pymem.state import set_state_threads, state_threads


@pytest.fixture(autouse=True)
def _restore_setting() -> Iterator[None]:
    yield
    set_state_threads(0)  # back to the default


NAMES = ["f16-trans", "f32-notrans", "q8_0-notrans", "f16-trans-streams"]


def _filled(name: str, seed: int) -> KVCache:
    """3 sequences spread over many irregular runs of cells, random K/V bytes."""
    kv = build(CFGS[name], n_cells=1024, n_seq=3)
    _interleaved(kv, np.random.default_rng(seed), 3, 150, 24)
    randomize(kv, seed + 4)
    return kv


@pytest.mark.parametrize("name", NAMES)
def test_threaded_writes_equal_one_thread(name: str) -> None:
    kv = _filled(name, 3)
    set_state_threads(1)
    one = [bytes(kv.state_write(s)) for s in (-1, 0, 1, 2)]
    for n in (2, 3, 7, 64):
        set_state_threads(n, 0)  # every section, however small, is split
        assert [bytes(kv.state_write(s)) for s in (-1, 0, 1, 2)] == one, n
        out = bytearray(len(one[1]))
        assert kv.state_write_buffer(out, 0) == len(one[1]) and bytes(out) == one[1]
    kv.close()


@pytest.mark.parametrize("name", NAMES)
def test_threaded_restores_equal_one_thread(name: str) -> None:
    # every restore road: a sequence back into its own cells (one native walk), into other
    # cells of a fresh cache (placement, then the payload store), the whole cache
    src = _filled(name, 5)
    blobs = {s: bytes(src.state_write(s)) for s in (-1, 0, 1, 2)}
    results = []
    for n in (1, 2, 5, 64):
        set_state_threads(n, 0)
        own = build(CFGS[name], n_cells=1024, n_seq=3)
        own.state_read(blobs[-1])  # whole
        for s in (0, 1, 2):
            own.state_read(blobs[s], s)  # each back into its own cells
        fresh = build(CFGS[name], n_cells=1024, n_seq=3)
        for s in (2, 0):
            fresh.state_read(blobs[s], s)  # placed into an empty cache
        results.append((bytes(own.state_write()), bytes(fresh.state_write())))
        own.close()
        fresh.close()
    assert results[0][0] == blobs[-1]
    assert all(r == results[0] for r in results[1:])
    src.close()


@pytest.mark.parametrize(
    ("env", "want"),
    [("3", 3), ("1", 1), ("64", 64), ("0", None), ("x", None), (" 3", None), ("3 ", None),
     ("", None)],
)  # fmt: skip
def test_the_default_follows_pymem_state_threads(env: str, want: int | None) -> None:
    # a count in [1, 64] sets the default thread count; anything else leaves min(4, CPUs)
    code = "import pymem; print(pymem.state_threads()[0])"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYMEM_STATE_THREADS": env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert int(run.stdout) == (want if want is not None else _default_threads())


@pytest.mark.parametrize(
    ("env", "want"),
    [("3145728", 3 << 20), ("0", 0), ("4611686018427387904", 1 << 62),
     ("4611686018427387905", None), ("99999999999999999999", None), ("-1", None),
     ("+5", None), (" 5", None), ("1M", None), ("", None)],
)  # fmt: skip
def test_the_default_min_bytes_follows_pymem_state_min_bytes(env: str, want: int | None) -> None:
    # a byte count in [0, 2**62] sets the defaults' min_bytes, which a count alone keeps
    # and the split follows; anything else leaves 1 MiB
    code = (
        "import pymem, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_state_threads import _split_shares\n"
        "a = pymem.state_threads()[1]\n"
        "pymem.set_state_threads(2)\n"
        "print(a, pymem.state_threads()[1], *_split_shares())\n"
    )
    run = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)],
                         env={**os.environ, "PYMEM_STATE_MIN_BYTES": env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    default, kept, big, small = (int(x) for x in run.stdout.split())
    want = 1 << 20 if want is None else want
    assert default == kept == want
    # the 1.25 MiB and 0.75 MiB sections of _split_shares: split from the setting on
    assert (big, small) == (2 if want <= 5 << 18 else 1, 2 if want <= 3 << 18 else 1)


def _split_shares() -> tuple[int, int]:
    """The shares of a one-sequence write of 1.25 MiB of K/V bytes, then of the same
    sequence cut to 0.75 MiB, under the setting in effect."""
    from pymem._native import lib

    kv = build(CFGS["f32-notrans"], n_cells=4096, n_seq=1)
    per_cell = sum(t.nbytes // kv.kv_size for layer in kv.layers for t in (layer.k, layer.v))
    _interleaved(kv, np.random.default_rng(2), 1, (5 << 18) // per_cell, 64)
    kv.state_write(0)
    big = int(lib.pm_copy_last_shares())
    kv.seq_rm(0, (3 << 18) // per_cell, -1)
    kv.state_write(0)
    small = int(lib.pm_copy_last_shares())
    kv.close()
    return big, small


def _default_threads() -> int:
    """min(4, online CPUs), as the native side counts them (sysconf, not os.cpu_count)."""
    return max(1, min(4, os.sysconf("SC_NPROCESSORS_ONLN")))


@pytest.mark.skipif("PYMEM_STATE_THREADS" in os.environ, reason="the default comes from it")
def test_set_state_threads_sets_reports_and_refuses_with_the_field() -> None:
    set_state_threads(0)  # the default: min(4, online CPUs) from 1 MiB on
    assert state_threads() == (_default_threads(), 1 << 20)
    set_state_threads(2)  # a count alone keeps the default's 1 MiB
    assert state_threads() == (2, 1 << 20)
    set_state_threads(3, 3 << 20)
    assert state_threads() == (3, 3 << 20)
    for n, min_bytes in ((-1, 0), (65, 0), (True, 0), (2.0, 0), (2, -1), (0, 1 << 20)):
        with pytest.raises(ConfigError, match=r"set_state_threads: (n|min_bytes) = "):
            set_state_threads(n, min_bytes)  # type: ignore[arg-type]
    assert state_threads() == (3, 3 << 20)
    assert pymem.set_state_threads is set_state_threads and pymem.state_threads() == (3, 3 << 20)


@pytest.mark.parametrize("n", [1, 2])
def test_a_cache_without_layers_writes_its_headers(n: int) -> None:
    # no piece to copy at all (a composite's KV part that holds no layer): the cells and
    # headers only, under every thread count (pm_copy_all once read a share it never set)
    from test_iswa import decode

    from pymem.spec import LayerSpec, ModelSpec

    spec = ModelSpec(layers=(LayerSpec.attention(2, 8),))

    def layerless() -> KVCache:
        return KVCache(spec, kv_size=64, filter=lambda il: False, type_k="f16", type_v="f16",
                       unified=True, n_seq_max=2)  # fmt: skip

    kv = layerless()
    assert not kv.layers
    assert decode(kv, [[1, 0, [0], False], [2, 1, [0], True]]) == 0
    set_state_threads(n, 0)
    blob = bytes(kv.state_write(0))
    other = layerless()
    assert other.state_read(blob, 0) == len(blob) and other.seq_pos_max(0) == 1
    assert bytes(other.state_write()) == bytes(kv.state_write())
    kv.close()
    other.close()


@pytest.mark.parametrize("n_rs_seq", [0, 2])
def test_recurrent_sections_native_equal_general(n_rs_seq: int) -> None:
    # the whole state's tensor sections in one native call (pm_rows_sections) against the
    # per-tensor road, with runs out of order (a copy-on-write source, cells reused), at
    # every thread count; a restore of it too
    from test_recurrent import fill_rows, make_rec, place

    mem = make_rec(n_seq=6, n_rs_seq=n_rs_seq, mem_size=6)
    fill_rows(mem)
    place(mem, (0, 3), (1, 5), (2, 7), (3, 2), (4, 9))
    mem.seq_rm(1)
    mem.seq_cp(4, 5)
    place(mem, (5, 10))  # 5 leaves 4's cell: its row is read from its source
    mem._seq_rows = None  # the per-tensor road
    general = [bytes(mem.state_write(s)) for s in (-1, 0, 4, 5)]
    mem._seq_rows = False  # the native one, built on first use
    for n in (1, 2, 3, 64):
        set_state_threads(n, 0)
        assert [bytes(mem.state_write(s)) for s in (-1, 0, 4, 5)] == general, n
        other = make_rec(n_seq=6, n_rs_seq=n_rs_seq, mem_size=6)
        fill_rows(other)
        assert other.state_read(general[0]) == len(general[0])
        assert bytes(other.state_write()) == general[0]
        other.close()
    mem.close()


@pytest.mark.parametrize("name", [*NAMES, "mrope-ext"])
def test_native_zeroing_equals_the_numpy_reference(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # a whole restore zeroes the cells its blob does not fill in one native call
    # (pm_stateio_put_cells without sources); kv.state_rows.zero_range is the reference
    from pymem.kv import state_io
    from pymem.kv.state_rows import zero_range

    for n in (1, 2):
        set_state_threads(n, 0)
        native, numpy = _filled(name, 9), _filled(name, 9)
        for strm in range(native.n_stream):
            for a, b in ((5, 9), (0, 1), (700, native.kv_size), (3, 3)):
                assert state_io.zero_range_native(native.layout, native.layers, strm, a, b)
                zero_range(numpy.layout, numpy.layers, strm, a, b)
        for x, y in zip(native.layers, numpy.layers, strict=True):
            for t, u in ((x.k, y.k), (x.v, y.v)):
                if t is not None:
                    assert t.read_bytes() == u.read_bytes()
        # the reference road switched on: declined, nothing zeroed (the caller zeroes)
        before = [layer.k.read_bytes() for layer in native.layers]
        with monkeypatch.context() as m:
            m.setattr(state_io, "NATIVE_RUNS", False)
            assert not state_io.zero_range_native(native.layout, native.layers, 0, 10, 20)
        assert [layer.k.read_bytes() for layer in native.layers] == before
        native.close()
        numpy.close()


def test_the_split_follows_the_setting() -> None:
    """pm_copy_last_shares (a test hook) shows the data phase's split, which the bytes
    cannot: as many shares as threads set (never more than the section's pieces), one
    below min_bytes, one on one thread; a write and a restore alike."""
    from pymem._native import lib

    kv = _filled("f16-trans", 7)  # 2 layers: K and V pieces per layer, one per V channel
    blob = bytes(kv.state_write())
    for n, min_bytes, want in ((2, 0, 2), (3, 0, 3), (2, len(blob) * 2, 1), (1, 0, 1)):
        set_state_threads(n, min_bytes)
        kv.state_write()
        assert lib.pm_copy_last_shares() == want, ("write", n, min_bytes)
        kv.state_read(blob)
        assert lib.pm_copy_last_shares() == want, ("read", n, min_bytes)
    # more threads than pieces: one share a piece (a cache of one layer, V in rows)
    rows = build(CFGS["f32-notrans"], n_cells=64, n_seq=1)
    _interleaved(rows, np.random.default_rng(1), 1, 20, 8)
    pieces = 2 * len(rows.layers)
    set_state_threads(64, 0)
    rows.state_write()
    assert lib.pm_copy_last_shares() == pieces
    rows.close()
    kv.close()


def test_the_default_splits_from_one_mib_of_tensor_bytes() -> None:
    """A count alone keeps the default's min_bytes: one sequence's section of 1.25 MiB of
    K/V bytes is split, the same sequence cut to 0.75 MiB moves on the calling thread
    (a 2.2 MB sequence of an 8,192-token tiny-llama gains a third from the second thread;
    below about 0.8 MB the wake costs what it saves: docs/performance.md)."""
    from pymem._native import lib

    kv = build(CFGS["f32-notrans"], n_cells=4096, n_seq=1)
    per_cell = sum(t.nbytes // kv.kv_size for layer in kv.layers for t in (layer.k, layer.v))
    big, small = (5 << 18) // per_cell, (3 << 18) // per_cell  # 1.25 and 0.75 MiB of cells
    _interleaved(kv, np.random.default_rng(2), 1, big, 64)
    set_state_threads(2)
    blob = bytes(kv.state_write(0))
    assert lib.pm_copy_last_shares() == 2
    kv.state_read(blob, 0)
    assert lib.pm_copy_last_shares() == 2
    kv.seq_rm(0, small, -1)
    blob = bytes(kv.state_write(0))
    assert lib.pm_copy_last_shares() == 1
    kv.state_read(blob, 0)
    assert lib.pm_copy_last_shares() == 1
    kv.close()


def test_the_copy_workers_are_kept_and_grow_to_what_a_call_asks() -> None:
    """Threaded calls share workers started once: a second call starts none, a call
    asking for more threads starts only the missing ones, a smaller count starts none."""
    from pymem._native import lib

    kv = _filled("f16-trans", 9)
    set_state_threads(2, 0)
    kv.state_write()
    have = lib.pm_copy_workers()
    assert have >= 1
    kv.state_write()
    assert lib.pm_copy_workers() == have
    set_state_threads(4, 0)
    kv.state_write()
    assert lib.pm_copy_workers() == max(have, 3)
    set_state_threads(2, 0)
    kv.state_write()
    assert lib.pm_copy_workers() == max(have, 3)
    kv.close()


def test_threaded_calls_from_several_threads_at_once_move_the_right_bytes() -> None:
    """Python threads writing and restoring at once (the native calls release the GIL):
    one holds the workers, the others copy alone; every blob and restore is right."""
    import threading

    caches = [_filled(name, 11 + i) for i, name in enumerate(NAMES)]
    set_state_threads(1)
    want = [[bytes(kv.state_write(s)) for s in (-1, 0)] for kv in caches]
    set_state_threads(3, 0)
    errors: list[BaseException] = []

    def work(kv: KVCache, blobs: list[bytes]) -> None:
        try:
            for _ in range(30):
                for s, blob in zip((-1, 0), blobs):
                    assert bytes(kv.state_write(s)) == blob
                    kv.state_read(blob, s)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(kv, w)) for kv, w in zip(caches, want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for kv, w in zip(caches, want):
        assert [bytes(kv.state_write(s)) for s in (-1, 0)] == w
        kv.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_copy_workers() -> None:
    """A child forked after threaded copies (workers running, possibly mid-wait) has none:
    its first threaded call starts its own and moves the right bytes, with no deadlock."""
    script = """
import os, sys
import numpy as np
sys.path.insert(0, "tests")
from test_state_threads import _filled
from pymem._native import lib
from pymem.state import set_state_threads
kv = _filled("f16-trans", 13)
set_state_threads(1)
want = bytes(kv.state_write())
set_state_threads(2, 0)
assert bytes(kv.state_write()) == want and lib.pm_copy_workers() >= 1
pid = os.fork()
if pid == 0:
    code = 0 if lib.pm_copy_workers() == 0 else 3
    ok = bytes(kv.state_write()) == want and lib.pm_copy_workers() >= 1
    kv.state_read(want)
    os._exit(code if ok and bytes(kv.state_write()) == want else 4)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_a_lower_thread_count_keeps_extra_workers_out() -> None:
    """Workers started for a larger count stay, but a call asking for fewer threads lets
    no more than its count - 1 of them in (found by review: every worker took shares)."""
    from pymem._native import lib

    kv = build(CFGS["f32-notrans"], n_cells=8192, n_seq=1)
    _interleaved(kv, np.random.default_rng(15), 1, 8000, 4000)  # ~4 MB: time for workers
    set_state_threads(4, 0)
    kv.state_write()
    assert lib.pm_copy_workers() >= 3
    set_state_threads(2, 0)
    joined = []
    for _ in range(30):
        kv.state_write()
        joined.append(lib.pm_copy_last_helpers())
    assert max(joined) <= 1, joined
    set_state_threads(1)
    kv.close()
