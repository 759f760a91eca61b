"""The recorded run mamba.main.u1 on a RecurrentMemory built by hand from the run's memory section.

tests/test_replay_runs.py replays every recorded run through the factory's memory
(results, positions, sizes and blobs after each step, failed restores re-enacted).
What this test adds, on the recurrent memory's own constructor:

* the bytes it allocates (``memory_breakdown``);
* the recurrent invariant checker after every step;
* the graph's part played for the cells each ubatch wrote only (``[head, head + n_rs)``,
  tests/written_rows.py), so rows of cells no ubatch touched are pymem's own;
* the truncated restore (step 15) refused without changing tails, positions or head.
"""

from __future__ import annotations

from recurrent_helpers import check_invariants
from replay import DATA, Run
from written_rows import WrittenRows, replay_written

from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec

RUN = DATA / "runs" / "mamba.main.u1.json"


def make_memory(run: Run) -> RecurrentMemory:
    m = run.data["memory"]
    part = m["parts"][0]
    layers = tuple(LayerSpec.ssm(lay["n_embd_r"], lay["n_embd_s"]) for lay in m["layers"])
    return RecurrentMemory(
        ModelSpec(layers=layers, arch=m["arch"]),
        type_r=part["r_type"],
        type_s=part["s_type"],
        mem_size=part["mem_size"],
        n_seq_max=m["n_seq_max"],
        n_rs_seq=part["n_rs_seq"],
    )


def test_replay_mamba() -> None:
    run = Run.load(RUN)
    mem = make_memory(run)
    # 4 cells x 2 layers x (R 96 + S 128) f32
    assert mem.memory_breakdown() == {"CPU": 4 * (2 * 384 + 2 * 512)}
    hooks = WrittenRows(run, check_invariants)
    report = replay_written(run, mem, hooks)
    assert report.steps == 33 and report.failed_restores == 1 and hooks.refused == 1
    assert hooks.decodes == 12
    assert report.blobs_compared == 31 * 5  # 31 steps with 4 per-sequence blobs + the whole
