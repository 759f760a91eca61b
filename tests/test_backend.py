"""The native layer: devices, tensor stores, batch I/O, device row copies, errors."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import pymem
from pymem.backend import TensorSpec, TensorStore
from pymem.errors import (
    ClosedError,
    DeviceError,
    OutOfMemoryError,
    RangeError,
    TypeSpecError,
)
from pymem.types import TYPES, ggml_type

RNG = np.random.default_rng(1234)


def random_bytes(n: int) -> np.ndarray:
    return RNG.integers(0, 256, size=n, dtype=np.uint8)


def test_ggml_info_names_a_supported_ggml() -> None:
    info = pymem.ggml_info()
    major, minor = (int(x) for x in info.version.split(".")[:2])
    assert (major, minor) >= (0, 20)
    assert info.source in {"process", "env", "bundled", "llama_cpp", "libggml-python"}
    assert "CPU" in info.backends


@pytest.mark.parametrize("version", ["0.19.9", "1.0.0", "2.3", "unknown", ""])
def test_ggml_outside_the_supported_range_is_refused(version: str) -> None:
    from pymem._native import check_version
    from pymem.errors import GGMLBindingError

    with pytest.raises(
        GGMLBindingError,
        match=f"ggml version '{version}' from /x .*outside the supported range >= 0.20.0, < 1.0.0",
    ):
        check_version(version, "/x (env)")


@pytest.mark.parametrize("version", ["0.20.0", "0.20.2", "0.25.3", "0.99.1-dirty"])
def test_ggml_inside_the_supported_range_is_accepted(version: str) -> None:
    from pymem._native import check_version

    check_version(version, "/x (env)")


def test_devices_include_cpu_with_memory() -> None:
    devs = pymem.devices()
    cpu = [d for d in devs if d.name == "CPU"]
    assert cpu and cpu[0].kind == "cpu" and cpu[0].is_host
    free, total = cpu[0].memory()
    assert 0 < free <= total
    assert pymem.get_device("cpu") is cpu[0]


def test_unknown_device_is_refused_with_the_names() -> None:
    with pytest.raises(DeviceError, match=r"unknown device 'NoSuchGPU'.*CPU"):
        pymem.get_device("NoSuchGPU")


def test_type_table_covers_ggml_types() -> None:
    assert ggml_type("f16").type_size == 2 and ggml_type("f16").block_size == 1
    q8 = ggml_type("Q8_0")
    assert (q8.block_size, q8.type_size, q8.is_quantized) == (32, 34, True)
    assert q8.row_size(64) == 68
    assert ggml_type(0).name == "f32"
    assert {"f32", "f16", "bf16", "q4_0", "q8_0", "i32", "i64"} <= set(TYPES)
    with pytest.raises(TypeSpecError, match="not a multiple of the block size 32"):
        q8.row_size(33)
    with pytest.raises(TypeSpecError, match="unknown ggml type 'f17'"):
        ggml_type("f17")


@pytest.mark.parametrize("type_name", ["f32", "f16", "bf16", "q8_0", "q4_0", "i32"])
def test_allocation_shapes_and_zero_fill(device: str, type_name: str) -> None:
    gtype = ggml_type(type_name)
    width = 4 * gtype.block_size
    with TensorStore(
        device,
        [
            TensorSpec("cache_k_l0", type_name, (width, 16, 2)),
            TensorSpec("cache_r_l1", "f32", (96, 4)),
        ],
    ) as store:
        k = store["cache_k_l0"]
        assert k.shape == (width, 16, 2, 1)
        assert k.type.name == type_name
        assert k.row_size == gtype.row_size(width) == k.nb[1]
        assert k.nb[2] == 16 * k.row_size
        assert k.nbytes == 32 * k.row_size and k.n_rows == 32
        assert store.nbytes >= k.nbytes + store["cache_r_l1"].nbytes
        assert not any(k.read_bytes())


def test_byte_round_trip(device: str) -> None:
    with TensorStore(device, [TensorSpec("t", "f16", (64, 32))]) as store:
        t = store["t"]
        data = random_bytes(t.nbytes)
        t.write_bytes(data)
        assert t.read_bytes() == data.tobytes()
        t.write_bytes(b"\x01\x02\x03", offset=10)
        assert t.read_bytes(9, 5) == bytes([data[9], 1, 2, 3, data[13]])


def test_copies_at_every_offset_of_a_page_are_exact() -> None:
    """pm_tensor_read / pm_tensor_write of host tensors (pm_copy_bytes, the copy of every
    state run): a long copy whose destination lies under 64 bytes past its source modulo
    4 KiB goes backward in 64-byte blocks (glibc's memcpy is several times slower there on
    AMD CPUs). Every size around the 1,024-byte and 64-byte bounds, at destination offsets
    inside and outside that window, copies exactly the bytes asked and nothing around them."""
    from pymem._native import ffi, lib

    with TensorStore("cpu", [TensorSpec("t", "i8", (1 << 16,))]) as store:
        t = store["t"]
        data = random_bytes(t.nbytes)
        t.write_bytes(data)
        tensor_at = int(ffi.cast("uintptr_t", t.ptr.data))
        pad = 8192
        for size in (1, 63, 1023, 1024, 1025, 1087, 1088, 4113, 20000):
            for src_off in (0, 5, 4000):
                for delta in (0, 1, 17, 63, 64, 100, 4095):
                    buf = np.zeros(size + 2 * pad, dtype=np.uint8)
                    base = buf.ctypes.data + pad
                    # a destination delta bytes past the source, modulo 4 KiB
                    at = pad + (tensor_at + src_off + delta - base) % 4096
                    out = buf[at : at + size]
                    assert lib.pm_tensor_read(t.ptr, src_off, size, ffi.from_buffer(out)) == 0
                    assert np.array_equal(out, data[src_off : src_off + size]), (size, delta)
                    assert not buf[:at].any() and not buf[at + size :].any(), (size, delta)
                    # and back into the tensor from a source delta bytes before it
                    src = buf.copy()
                    at = pad + (tensor_at + src_off - delta - base) % 4096
                    piece = random_bytes(size)
                    src[at : at + size] = piece
                    view = src[at : at + size]
                    assert lib.pm_tensor_write(t.ptr, src_off, size, ffi.from_buffer(view)) == 0
                    want = data.copy()
                    want[src_off : src_off + size] = piece
                    assert t.read_bytes() == want.tobytes(), (size, delta)
                    t.write_bytes(data)


def test_row_and_run_copies_at_aliased_offsets_are_exact() -> None:
    """Row copies (copy_rows) and tensor-to-tensor runs (copy_runs_from) whose
    destination lies 16 bytes past the source modulo 4 KiB take pm_copy_bytes' backward
    loop where the ranges are apart and memmove where they overlap: rows of 16,400 bytes
    copied a row on (single rows, apart) and as one overlapping run of two rows, and a
    run between two tensors at that offset, all equal numpy's result."""
    row = 16384 + 16
    with TensorStore(
        "cpu", [TensorSpec("a", "i8", (row, 12)), TensorSpec("b", "i8", (row, 12))]
    ) as store:
        a, b = store["a"], store["b"]
        data = random_bytes(a.nbytes).reshape(12, row)
        a.write_bytes(data)
        want = data.copy()
        a.copy_rows([0, 2, 4], a, [1, 3, 5])  # each row to the next: apart, 16 bytes on
        want[[1, 3, 5]] = want[[0, 2, 4]]
        assert np.array_equal(a.read_rows(range(12)), want)
        a.copy_rows([6, 7], a, [7, 8])  # one run overlapping itself, each way
        want[[7, 8]] = want[[6, 7]]
        a.copy_rows([10, 11], a, [9, 10])
        want[[9, 10]] = want[[10, 11]]
        assert np.array_equal(a.read_rows(range(12)), want)
        b.write_bytes(np.zeros(b.nbytes, np.uint8))
        # b's bytes from 16 + k * 4096 on: 16 bytes past a's source modulo 4 KiB, when the
        # two buffers are a page apart (the run's own offset makes the delta either way)
        b.copy_runs_from(a, 100, 116, 1, 0, [0, 5000], [3000, 20000])
        got = np.frombuffer(b.read_bytes(), np.uint8)
        flat = want.reshape(-1)
        assert np.array_equal(got[116:3116], flat[100:3100])
        assert np.array_equal(got[5116:25116], flat[3100:23100])
        assert not got[:116].any() and not got[3116:5116].any() and not got[25116:].any()


def test_row_round_trip_any_order(device: str) -> None:
    with TensorStore(device, [TensorSpec("t", "q8_0", (64, 100))]) as store:
        t = store["t"]
        full = random_bytes(t.nbytes).reshape(100, t.row_size)
        t.write_bytes(full)
        rows = np.array([7, 8, 9, 3, 99, 0, 50, 51], dtype=np.int64)
        np.testing.assert_array_equal(t.read_rows(rows), full[rows])
        new = random_bytes(rows.size * t.row_size).reshape(rows.size, -1)
        t.write_rows(rows, new)
        full[rows] = new
        np.testing.assert_array_equal(t.read_rows(np.arange(100)), full)
        t.fill_rows([1, 2, 3], 0)
        full[[1, 2, 3]] = 0
        np.testing.assert_array_equal(t.read_rows(np.arange(100)), full)
        t.fill_row_range(97, 3, 7)
        t.fill_row_range(0, 0, 9)  # an empty range writes nothing
        full[97:] = 7
        np.testing.assert_array_equal(t.read_rows(np.arange(100)), full)
        for first, count, value in ((98, 3, 0), (-1, 1, 0), (0, -1, 0), (0, 1, 256)):
            with pytest.raises(RangeError, match="fill_row_range"):
                t.fill_row_range(first, count, value)
        np.testing.assert_array_equal(t.read_rows(np.arange(100)), full)


def test_strided_region_round_trip(device: str) -> None:
    # the transposed V layout: element j of cells [a, b) sits at (a + j * kv_size) * el
    kv_size, width, el = 32, 8, 2
    with TensorStore(device, [TensorSpec("v", "f16", (kv_size, width))]) as store:
        v = store["v"]
        full = random_bytes(v.nbytes)
        v.write_bytes(full)
        a, b = 5, 9
        got = v.read_strided(a * el, (b - a) * el, kv_size * el, width)
        expect = full.reshape(width, kv_size * el)[:, a * el : b * el]
        np.testing.assert_array_equal(got, expect)
        new = random_bytes(got.size)
        v.write_strided(new, a * el, (b - a) * el, kv_size * el, width)
        full.reshape(width, kv_size * el)[:, a * el : b * el] = new.reshape(width, -1)
        assert v.read_bytes() == full.tobytes()


def test_scattered_ranges_round_trip(device: str) -> None:
    with TensorStore(device, [TensorSpec("t", "f16", (64, 8))]) as store:
        t = store["t"]
        full = random_bytes(t.nbytes)
        t.write_bytes(full)
        offsets, sizes = [900, 3, 128, 1000], [10, 0, 64, 24]
        out = bytearray(sum(sizes))
        t.read_ranges_into(out, offsets, sizes)
        expect = b"".join(full[o : o + n].tobytes() for o, n in zip(offsets, sizes))
        assert bytes(out) == expect
        new = random_bytes(len(out))
        t.write_ranges(new, offsets, sizes)
        for (o, n), chunk in zip(zip(offsets, sizes), np.split(new, np.cumsum(sizes)[:-1])):
            full[o : o + n] = chunk
        assert t.read_bytes() == full.tobytes()
        with pytest.raises(RangeError, match=r"range\[1\] = \[1020, 1030\) outside \[0, 1024\)"):
            t.read_ranges_into(bytearray(20), [0, 1020], [10, 10])


def test_device_row_copy_within_and_between_tensors(device: str) -> None:
    with TensorStore(
        device,
        [
            TensorSpec("a", "f32", (16, 20)),
            TensorSpec("b", "f32", (16, 20)),
            TensorSpec("c", "f16", (16, 20)),
        ],
    ) as store:
        a, b = store["a"], store["b"]
        full = RNG.standard_normal((20, 16)).astype(np.float32)
        a.write_bytes(full)
        a.copy_rows([0, 1, 2, 10], b, [5, 6, 7, 0])
        got = b.read_rows([5, 6, 7, 0]).view(np.float32)
        np.testing.assert_array_equal(got, full[[0, 1, 2, 10]])
        a.copy_rows([0, 1], a, [1, 2])  # overlapping run within one tensor
        np.testing.assert_array_equal(a.read_rows([1, 2]).view(np.float32), full[[0, 1]])
        with pytest.raises(TypeSpecError, match="type/row size f32/64 != f16/32"):
            a.copy_rows([0], store["c"], [0])


def test_zero_width_tensor_beside_others(device: str) -> None:
    # LFM2's S state is zero-wide: rows exist but hold no bytes
    with TensorStore(
        device, [TensorSpec("r", "f32", (8, 4)), TensorSpec("s", "f32", (0, 4))]
    ) as store:
        s = store["s"]
        assert (s.row_size, s.n_rows, s.nbytes) == (0, 4, 0)
        assert s.read_rows([0, 3]).shape == (2, 0)
        s.write_rows([1], b"")
        s.copy_rows([0], s, [2])
        store["r"].fill_rows([0], 1)
        assert store["r"].read_rows([0])[0].tolist() == [1] * 32


def test_numpy_views_share_memory() -> None:
    with TensorStore(
        "CPU", [TensorSpec("s", "f32", (8, 4)), TensorSpec("q", "q8_0", (32, 3))]
    ) as store:
        view = store["s"].numpy()
        assert view.shape == (4, 8) and view.dtype == np.float32
        view[2, 3] = 7.5
        assert store["s"].read_rows([2]).view(np.float32)[0, 3] == 7.5
        store["s"].write_rows([1], np.full(8, 2.0, np.float32))
        assert view[1].tolist() == [2.0] * 8
        assert store["q"].numpy().shape == (3, 34)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (
            TensorSpec("t", "q8_0", (33, 4)),
            TypeSpecError,
            "width shape\\[0\\]=33 is not a multiple of the block size 32",
        ),
        (TensorSpec("t", "nope", (32, 4)), TypeSpecError, "unknown ggml type 'nope'"),
        (TensorSpec("t", "f32", (4, 0)), TypeSpecError, "shape\\[1\\] must be an int >= 1, got 0"),
        (TensorSpec("t", "f32", (0, 4)), TypeSpecError, "every tensor of the store is empty"),
        (TensorSpec("t", "f32", (1, 2, 3, 4, 5)), TypeSpecError, "1 to 4 dims"),
    ],
)
def test_bad_specs_raise_before_ggml(spec: TensorSpec, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        TensorStore("CPU", [spec])


def test_allocation_larger_than_the_device_is_refused(device: str) -> None:
    free, total = pymem.get_device(device).memory()
    width = 1 << 20
    rows = (max(free, total) // (width * 4)) * 2 + 1
    with pytest.raises(OutOfMemoryError, match="bytes requested, the device has"):
        TensorStore(device, [TensorSpec("huge", "f32", (width, rows))])


def test_io_errors_name_the_value_and_limit(device: str) -> None:
    with TensorStore(device, [TensorSpec("t", "f32", (4, 10))]) as store:
        t = store["t"]
        with pytest.raises(RangeError, match=r"rows\[1\] = 10 is outside \[0, 10\)"):
            t.read_rows([0, 10])
        with pytest.raises(RangeError, match=r"rows\[0\] = -1"):
            t.write_rows([-1], np.zeros(4, np.float32))
        with pytest.raises(RangeError, match="data holds 8 bytes, expected 16"):
            t.write_rows([0], np.zeros(2, np.float32))
        with pytest.raises(RangeError, match=r"bytes \[150, 170\) outside \[0, 160\)"):
            t.write_bytes(bytes(20), offset=150)
        with pytest.raises(RangeError, match=r"region \[0, 200\) outside \[0, 160\)"):
            t.read_strided(0, 20, 60, 4)
        with pytest.raises(KeyError, match="no tensor 'x'"):
            store["x"]


def test_closed_store_refuses_io() -> None:
    store = TensorStore("CPU", [TensorSpec("t", "f32", (4, 4))])
    t = store["t"]
    store.close()
    store.close()  # idempotent
    with pytest.raises(ClosedError):
        t.read_bytes()
    with pytest.raises(ClosedError):
        store["t"]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


@pytest.mark.skipif(
    bool(os.environ.get("PYMEM_SANITIZED")), reason="ASan's quarantine holds freed memory by design"
)
def test_allocate_free_cycles_do_not_grow_memory() -> None:
    def cycle(n: int) -> None:
        for _ in range(n):
            with TensorStore(
                "CPU", [TensorSpec("k", "f16", (128, 256)), TensorSpec("v", "f16", (128, 256))]
            ) as s:
                s["k"].fill_rows([0, 1], 1)
            TensorStore("CPU", [TensorSpec("g", "f32", (64, 64))])  # freed by the finaliser
        gc.collect()

    cycle(200)  # warm up allocator pools
    before = _rss_kib()
    cycle(1000)
    growth = _rss_kib() - before
    assert growth < 2048, f"resident memory grew by {growth} KiB over 1000 cycles"


def test_public_names_resolve() -> None:
    import pymem as pm

    for name in pm._LAZY:
        assert getattr(pm, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pm.nope  # noqa: B018


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "import pymem, json; i = pymem.ggml_info(); print(json.dumps([i.source, i.path, i.version]))"
    # run outside the checkout, so `import pymem` finds the installed package, not ./pymem
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=tempfile.gettempdir())  # fmt: skip


def test_env_dir_is_bound_when_nothing_is_loaded() -> None:
    libggml = importlib.util.find_spec("libggml")
    assert libggml is not None and libggml.submodule_search_locations
    lib_dir = os.path.join(next(iter(libggml.submodule_search_locations)), "lib64")
    proc = _probe({"PYMEM_GGML_LIB_DIR": lib_dir})
    assert proc.returncode == 0, proc.stderr
    source, path, _version = json.loads(proc.stdout)
    assert (source, path) == ("env", lib_dir)


def test_env_dir_without_ggml_is_a_clear_error(tmp_path) -> None:
    proc = _probe({"PYMEM_GGML_LIB_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "GGMLBindingError" in proc.stderr
    assert (
        f"PYMEM_GGML_LIB_DIR='{tmp_path}': no libggml-base.so.0 and libggml.so.0 there"
        in proc.stderr
    )


def test_cli_runs_from_the_source_checkout() -> None:
    # `pip install . && python -m pymem demo` is typed in the checkout, whose pymem/ (no
    # compiled extension) shadows the installed package: the installed extension is used
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pymem", "info"], capture_output=True, text=True,
                          timeout=60, cwd=repo)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pymem ") and "device CPU" in proc.stdout
