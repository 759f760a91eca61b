"""Issue 14's state target, row by row: met, bound by the layout, or not met.

    python benchmarks/state_verdict.py [STATE_JSON ...] [--bound BOUND_JSON]

The target: every state write and read >= 0.8x a numpy copy of the same bytes (the
interleaved rows of ``bench_vs_llama_cpp --only state``); where the layout itself bounds
a call, >= 2x llama.cpp's same call, with a microbenchmark that shows the bound
(``bench_layout_bound --repeat N``: the least work of the call on the row's own geometry
below 0.8 of a copy). A state row's write is the write into a buffer; a row's read is
judged by the layout-bound call of its geometry (a swap-in's read by the swap-in, a read
into a cleared memory by that read; a restore that changes cells, ``whole state, another
one``, by the read of another state); a row whose bound call is missing from the
layout-bound run can only be met by the 0.8 line.

Defaults: ``results/state_s41.json`` and ``results/bench_layout_bound_repeat.json``.
Several state runs are judged one by one, then summed up (the rows met in every run),
since the line is within one run's spread for some rows. Writes nothing; prints a table
per run and the rows not met.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8
OVER_LLAMA_CPP = 2.0

# a state row (bench_vs_llama_cpp) -> the layout-bound calls (bench_layout_bound) of its
# write and its read (None: no bound measured for that geometry)
BOUND_CALLS: dict[str, tuple[str, str | None]] = {
    "one sequence": ("one sequence, write", "one sequence, read"),
    "whole state": ("whole, write", "whole, read"),
    # (a sequence swapped out and back in returns to its cells: its write sees the plain
    # layout; pinned by bench_layout_bound's "written after a swap-in" beside a fork)
    "one sequence, swapped in": ("one sequence, write", "one sequence, swapped in"),
    "whole state, into a cleared memory": ("whole, write", "whole, read into a cleared memory"),
    "one sequence, beside a fork": (
        "one sequence beside a fork, write",
        "one sequence beside a fork, read",
    ),
    "one sequence, beside a fork, swapped in": (
        "one sequence beside a fork, written after a swap-in",
        "one sequence beside a fork, swapped in",
    ),
    "whole state, forked": ("whole forked, write", "whole forked, read"),
    "whole state, forked, into a cleared memory": (
        "whole forked, write",
        "whole forked, read into a cleared memory",
    ),
    "whole state, another one": ("whole, write", "whole, read of another state"),
}


def verdicts(state_rows: list[dict[str, Any]], bound_rows: list[dict[str, Any]]) -> list[dict]:
    """One verdict per state row and side (write, read): ``met`` (>= TARGET of the copy),
    ``bound`` (below it, the least of its call below TARGET, and >= OVER_LLAMA_CPP times
    llama.cpp), else ``not met`` with the reason. ValueError for a row of an unknown kind."""
    least = {(r["model"], bool(r["v_trans"]), r["call"]): r for r in bound_rows}
    out = []
    for row in state_rows:
        if row["blob"] not in BOUND_CALLS:
            raise ValueError(f"state_verdict: no bound call known for the row {row['blob']!r}")
        copy = row["numpy_copy_gbs"]
        for side, key, call in (("write", "pymem_write_buffer_gbs", BOUND_CALLS[row["blob"]][0]),
                                ("read", "pymem_read_gbs", BOUND_CALLS[row["blob"]][1])):  # fmt: skip
            vs_copy = row[key] / copy
            vs_llama = row[key] / row[f"llama_cpp_{side}_gbs"]
            bound = least.get((f"tiny-{row['model']}", bool(row["v_trans"]), call))
            if vs_copy >= TARGET:
                verdict, why = "met", ""
            elif bound is None:
                verdict, why = "not met", "no bound measured for its geometry"
            elif not bound["bound"]:
                verdict, why = "not met", f"not bound (least {bound['least_vs_copy']:.2f})"
            elif vs_llama < OVER_LLAMA_CPP:
                verdict, why = "not met", f"bound, but {vs_llama:.1f}x llama.cpp"
            else:
                verdict, why = "bound", f"least {bound['least_vs_copy']:.2f}"
            out.append(dict(model=row["model"], v_trans=bool(row["v_trans"]), blob=row["blob"],
                            side=side, vs_copy=vs_copy, vs_llama_cpp=vs_llama,
                            verdict=verdict, why=why))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", nargs="*", default=[str(RESULTS / "state_s41.json")])
    ap.add_argument("--bound", default=str(RESULTS / "bench_layout_bound_repeat.json"))
    args = ap.parse_args(argv)
    bound_rows = json.loads(Path(args.bound).read_text())["rows"]
    missed: dict[tuple, int] = {}
    for path in args.state:
        rows = verdicts(json.loads(Path(path).read_text())["state"], bound_rows)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in ("met", "bound", "not met")}
        print(f"\n{path}: {counts['met']} met, {counts['bound']} bound, "
              f"{counts['not met']} not met")  # fmt: skip
        for r in rows:
            if r["verdict"] != "met":
                print(f"  {r['model']:7} {'T' if r['v_trans'] else 'R'} {r['blob']:44} "
                      f"{r['side']:5} {r['vs_copy']:.2f} of a copy, {r['vs_llama_cpp']:4.1f}x "
                      f"llama.cpp: {r['verdict']}{' (' + r['why'] + ')' if r['why'] else ''}")  # fmt: skip
            if r["verdict"] == "not met":
                key = (r["model"], r["v_trans"], r["blob"], r["side"])
                missed[key] = missed.get(key, 0) + 1
    print(f"\nnot met in some run: {len(missed)} of the rows ({len(args.state)} run(s))")
    for (model, v_trans, blob, side), n in sorted(missed.items()):
        print(f"  {model} {'T' if v_trans else 'R'} {blob} {side}: {n} run(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
