"""Simulator speed: 64 ranks x 10,000 requests (target: under 60 s on one core).

Writes benchmarks/results/sim_speed.json and .md. Pin to one core for a faithful figure, e.g.
`taskset -c 0 .venv/bin/python benchmarks/sim_speed.py`; BLAS threads are limited to one here.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim import load_config, simulate  # noqa: E402
from cluster.sim.config import apply_overrides  # noqa: E402
from cluster.sim.report import write_json  # noqa: E402

OVERRIDES = [
    "cluster.num_ranks=64",
    "workload.num_requests=10000",
    "workload.max_concurrency=2048",  # 64 ranks x max_num_seqs 32
    "workload.len_range_ratio=0.1",
]


def main() -> int:
    cfg = apply_overrides(load_config(ROOT / "ray_configs" / "sim-deepseek-v3.yaml"), OVERRIDES)
    rows = {}
    for policy in ("off", "any_at_cap"):
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        res = simulate(cfg, policy, record_rank_time=True)
        rows[policy] = {
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "steps": res.steps,
            "simulated_s": float(res.metrics()["duration_s"]),
            "output_tok_s": res.metrics()["output_tok_s"],
        }
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    payload = {
        "overrides": OVERRIDES,
        "results": rows,
        "python": platform.python_version(),
        "cpus_allowed": affinity,
        "target_s": 60,
    }
    write_json(ROOT / "benchmarks" / "results" / "sim_speed.json", payload)
    md = [
        "# `dpserve sim` speed: 64 ranks x 10,000 requests (calibrated costs, lengths +-10 %)",
        "",
        f"Python {payload['python']}, {affinity} CPU(s) allowed, BLAS threads 1. Target: < 60 s on one core.",
        "",
        "| policy | wall s | CPU s | steps | simulated s | output tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for p, r in rows.items():
        md.append(
            f"| {p} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['steps']} | {r['simulated_s']:.0f} | {r['output_tok_s']:.0f} |"
        )
    (ROOT / "benchmarks" / "results" / "sim_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
