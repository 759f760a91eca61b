"""Long seeded soak of pymem against the executable spec, every memory type, in parallel.

    python benchmarks/soak.py --steps 200000 --jobs 2 [--seed 500000] [--out benchmarks/results/soak.json]

Each memory type runs seeded random programs (40 steps each, configurations drawn by
tests/spec/gen.py) on pymem and the spec side by side until it has made ``--steps`` steps;
after every step the harness compares op results, placement, positions, ubatches, graph
inputs and state bytes (tests/spec/harness.py). The first divergence stops that type and is
written to the JSON with its seed and the program that led to it. The JSON (steps,
programs, seconds, steps/s and configurations covered per type) is what
docs/verification.md quotes (benchmarks/verify_report.py reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from spec.gen import PyRnd, random_config, random_step  # noqa: E402
from spec.harness import KINDS, Mismatch, Pair, Stats  # noqa: E402


def config_labels(kind: str, cfg: Any) -> list[str]:
    """The configuration values one program drew, as short labels (for coverage counts)."""
    labels = [
        f"n_seq_max={cfg.n_seq_max}",
        "unified" if cfg.unified else "streams",
        f"n_ubatch={cfg.n_ubatch}",
    ]
    if cfg.swa_type:
        labels.append(f"swa={['none', 'standard', 'chunked', 'symmetric'][cfg.swa_type]}")
    if kind in ("recurrent", "hybrid", "hybrid_iswa"):
        labels.append(f"n_rs_seq={cfg.n_rs_seq}")
    if cfg.n_pos > 1:
        labels.append("M-RoPE")
    if cfg.alibi:
        labels.append("alibi")
    if kind != "recurrent":
        labels.append(f"kv_size={cfg.kv_size}")
        labels.append(f"types={cfg.type_k}/{cfg.type_v}")
        labels.append("v_trans" if cfg.v_trans else "v rows")
    return labels


def soak_kind(kind: str, steps: int, seed0: int, program_steps: int = 40) -> dict[str, Any]:
    """Programs of one memory type until ``steps`` steps are made or one diverges."""
    logging.disable(logging.WARNING)
    total = Stats()
    cover: Counter[str] = Counter()
    t0 = time.monotonic()
    seed = seed0
    failure = None
    while total.steps < steps:
        seed += 1
        r = PyRnd(random.Random(f"{kind}-{seed}"))
        cfg = random_config(kind, r)
        cover.update(config_labels(kind, cfg))
        pair = Pair(cfg, check_seq_states=6)
        try:
            for _ in range(program_steps):
                random_step(pair, r)
        except Mismatch as e:
            failure = {"seed": f"{kind}-{seed}", "mismatch": str(e)}
            break
        finally:
            total.merge(pair.stats)
            pair.close()
    dt = time.monotonic() - t0
    return {
        "kind": kind,
        "steps": total.steps,
        "programs": seed - seed0,
        "seconds": round(dt, 1),
        "steps_per_s": round(total.steps / dt, 1),
        "seed_base": seed0,
        "ops": dict(sorted(total.ops.items())),
        "outcomes": dict(sorted(total.outcomes.items())),
        "configurations": dict(sorted(cover.items())),
        "failure": failure,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200_000, help="steps per memory type")
    ap.add_argument("--jobs", type=int, default=2, help="memory types soaked at once")
    ap.add_argument("--seed", type=int, default=500_000, help="seed base (programs seed+1, ...)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(soak_kind, k, args.steps, args.seed) for k in kinds]
        results = [f.result() for f in futures]
    print(f"{'memory':12s} {'steps':>9s} {'programs':>9s} {'seconds':>8s} {'steps/s':>8s}  result")
    for res in results:
        verdict = "ok" if res["failure"] is None else f"MISMATCH at {res['failure']['seed']}"
        print(
            f"{res['kind']:12s} {res['steps']:9d} {res['programs']:9d} {res['seconds']:8.1f} "
            f"{res['steps_per_s']:8.1f}  {verdict}"
        )
    total = sum(r["steps"] for r in results)
    print(f"{'total':12s} {total:9d}   wall {time.time() - t0:.0f} s, {args.jobs} jobs")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "commit": commit or "unknown",
        "machine": f"{platform.machine()} / Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - t0, 1),
        "jobs": args.jobs,
        "steps_total": total,
        "kinds": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(r["failure"] is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
