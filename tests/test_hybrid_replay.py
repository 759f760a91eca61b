"""The recorded run jamba.main.fa1.u0 on hybrid memory, with the hybrid's own checks.

tiny-jamba (recurrent, attention, recurrent, attention), flash attention on (V not
transposed), one attention stream per sequence, 4 sequences; the memory is built by
``pymem.factory.create_memory``. tests/test_replay_runs.py replays every recorded run
(results, positions, sizes and blobs after each step, failed restores re-enacted). What
this test adds:

* the bytes each part allocates (``memory_breakdown_by_part``);
* every part's invariants and the composition's position rules after every step;
* the graph's part played for the cells each ubatch wrote only (attention: the slot
  cells of each stream; recurrent: ``[head, head + n_rs)``; tests/written_rows.py), so
  the rows pymem copies between streams (a ``seq_cp`` to another stream is deferred to
  the next update) are pymem's own and compared with the reference;
* the truncated restore (step 15) refused without changing any cell metadata (the
  reference restores the attention part, fails in the recurrent part, then undoes the
  attention part).
"""

from __future__ import annotations

from hybrid_helpers import check_hybrid
from kv_helpers import parse_kv_part
from replay import DATA, Run, build_memory, strip_whole
from written_rows import WrittenRows, replay_written

from pymem.hybrid import HybridMemory

RUN = DATA / "runs" / "jamba.main.fa1.u0.json"


def test_replay_jamba() -> None:
    run = Run.load(RUN)
    mem = build_memory(run)
    assert isinstance(mem, HybridMemory) and not mem.is_iswa
    # attention: 2 layers x K/V [8, 256 cells, 4 streams] f16; recurrent: 2 layers x 4 cells x (96 + 128) f32
    assert mem.memory_breakdown_by_part() == {
        "attention": {"CPU": 2 * 2 * 8 * 256 * 4 * 2},
        "recurrent": {"CPU": 2 * 4 * (96 + 128) * 4},
    }
    hooks = WrittenRows(run, lambda m: check_hybrid(m, run.n_seq))  # type: ignore[arg-type]
    report = replay_written(run, mem, hooks)
    assert report.steps == 33 and report.failed_restores == 1 and hooks.refused == 1
    assert hooks.decodes == 12
    assert report.blobs_compared == 31 * 5  # two seq_rm steps record sizes but no blobs


def test_cross_stream_copy_is_deferred_in_the_reference() -> None:
    """The run holds a ``seq_cp`` to another stream whose blob shows the destination's K
    rows still zero (the copy waits for the next update), so the replay above compares
    pymem's deferred copy, done at the next decode's update, with the reference's."""
    run = Run.load(RUN)
    kv_layers = sum(1 for lay in run.data["memory"]["layers"] if lay["n_embd_k_gqa"])
    deferred = []
    for step in run.data["steps"]:
        if step["op"] == "seq_cp" and "state" in step:
            part = parse_kv_part(strip_whole(run.blob(step["state"]), run.arch), kv_layers)
            sp = part.streams[step["dst"]]
            deferred.append(sp is not None and not any(sp.k[0][2]))
    assert deferred and any(deferred)
