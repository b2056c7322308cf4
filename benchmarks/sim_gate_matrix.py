"""Gate matrix in the simulator: policies x workloads x DP sizes (writes benchmarks/results/sim_gate_matrix.*).

Every cell runs the calibrated DeepSeek-V3 config (ray_configs/sim-deepseek-v3.yaml, costs unchanged) with
max_num_seqs 32 per rank and compares each policy against `off` on output throughput, TPOT, mean and p99 TTFT.

Workloads (3500 in / 1500 out on average):
- ``seed``: fixed lengths, all requests ready at once, client concurrency = the group's slots;
- ``len10`` / ``len20`` / ``len30``: the same with input and output lengths uniform within +-10/20/30 %;
- ``poisson50`` ... ``poisson120``: +-20 % lengths, open-loop Poisson arrivals at 50-120 % of `off`'s
  request throughput on ``len20`` at the same DP size (its capacity);
- ``burst``: +-20 % lengths, arrivals in bursts of half the group's slots, on average at 80 % of capacity.

Policies: `off`, `any_at_cap`, `cadence` at intervals 1-16 (with `any_at_cap` they trace today's
frontier in the (TTFT increase, throughput gain) plane) and `bounded_hold` at its default and other hold
bounds (its own frontier), with ``load_queue_share`` 0 (no load signal: the queue extension applies
only while the snapshot itself queues) and with ``queue_hold_factor`` 1 (no queue extension: the rule
before #17). A policy "beats the frontier" in a cell when no frontier point has both at
least its throughput gain and at most its mean-TTFT increase.

Request counts: 4 x slots at 4 and 16 ranks, 2 x slots at 64 ranks; at 64 ranks only ``len20``,
``poisson100`` and ``burst`` run by default (``--workloads-64``), to keep the run in minutes.

Run: nice -n 10 .venv/bin/python benchmarks/sim_gate_matrix.py [--ranks 4 16] [--quick] [--seed 1 --out ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.sim import load_config, simulate  # noqa: E402
from cluster.sim.config import SimConfig, apply_overrides  # noqa: E402
from cluster.sim.report import write_json  # noqa: E402
from scheduler.policy import make_policy  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "ray_configs" / "sim-deepseek-v3.yaml"
SEQS = 32
DEFAULT = "bounded_hold"  # the policy the Done-means targets are checked for (its default parameters)

# (label, policy name, params); the first is the baseline.
POLICIES: list[tuple[str, str, dict[str, Any]]] = [
    ("off", "off", {}),
    ("any_at_cap", "any_at_cap", {}),
    *[(f"cadence{i}", "cadence", {"interval": i}) for i in (1, 2, 4, 8, 16)],
    ("bounded_hold", "bounded_hold", {}),
    *[(f"bounded_hold_h{h}", "bounded_hold", {"max_hold_steps": h}) for h in (4, 16, 32)],
    # The rule without the load signal (the queue extension only while the snapshot queues), and
    # without the queue extension at all (the rule before issue #17), for comparison.
    ("bounded_hold_l0", "bounded_hold", {"load_queue_share": 0.0}),
    ("bounded_hold_q1", "bounded_hold", {"queue_hold_factor": 1}),
]
FRONTIER = {"off", "any_at_cap", *(f"cadence{i}" for i in (1, 2, 4, 8, 16))}
CLOSED = {"seed": 0.0, "len10": 0.1, "len20": 0.2, "len30": 0.3}
OPEN = {"poisson50": 0.5, "poisson80": 0.8, "poisson100": 1.0, "poisson120": 1.2}


def _cell_config(base: SimConfig, ranks: int, workload: str, capacity: float | None) -> SimConfig:
    slots = ranks * SEQS
    n = (4 if ranks <= 16 else 2) * slots
    ov = [f"cluster.num_ranks={ranks}", f"cluster.max_num_seqs={SEQS}", f"workload.num_requests={n}"]
    if workload in CLOSED:
        ov += [f"workload.len_range_ratio={CLOSED[workload]}", f"workload.max_concurrency={slots}"]
    else:
        assert capacity is not None
        frac = OPEN.get(workload, 0.8)
        burst = max(1, slots // 2) if workload == "burst" else 1
        ov += [
            "workload.len_range_ratio=0.2",
            "workload.max_concurrency=null",
            f"workload.request_rate={frac * capacity}",
            f"workload.burst_size={burst}",
        ]
    return apply_overrides(base, ov)


def capacity_req_s(base: SimConfig, ranks: int) -> float:
    """Requests per second `off` serves at ``ranks`` with len20 (the open-loop workloads' 100 %)."""
    return simulate(_cell_config(base, ranks, "len20", None), "off", record_rank_time=False).metrics()[
        "request_s"
    ]


def target_met(vs_off: dict[str, float]) -> bool:
    """The target cell's Done-means (16 ranks, len20): >= +30 % throughput at <= +10 % mean TTFT."""
    return vs_off["thpt"] >= 0.30 and vs_off["ttft"] <= 0.10


def _rel(m: dict[str, float], b: dict[str, float], key: str) -> float:
    return m[key] / b[key] - 1.0


def _beats(cell: dict[str, dict[str, float]], label: str, tol: float = 0.005) -> bool:
    """True when no frontier point dominates ``label``: none has more throughput gain (by > ``tol``)
    at no more mean-TTFT increase (within ``tol``), nor a lower TTFT increase (by > ``tol``) at no
    less throughput (within ``tol``). Differences below half a percentage point count as ties."""
    me = cell[label]
    for f in FRONTIER:
        p = cell[f]
        if p["thpt"] > me["thpt"] + tol and p["ttft"] <= me["ttft"] + tol:
            return False
        if p["ttft"] < me["ttft"] - tol and p["thpt"] >= me["thpt"] - tol:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--quick", action="store_true", help="seed/len20/poisson100 only (a smoke run)")
    ap.add_argument(
        "--workloads-64",
        nargs="+",
        default=["len20", "poisson100", "burst"],
        help="workloads run at 64 ranks (each costs minutes there)",
    )
    ap.add_argument("--seed", type=int, default=None, help="the workload seed (default: the config's)")
    ap.add_argument("--out", default=str(OUT / "sim_gate_matrix"))
    ap.add_argument("--render-only", action="store_true", help="re-render <out>.md from <out>.json")
    args = ap.parse_args()
    if args.render_only:
        import json

        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        for c in data["cells"].values():
            c["beats_frontier"] = {lab: _beats(c["vs_off"], lab) for lab in c["beats_frontier"]}
        Path(args.out).with_suffix(".md").write_text(render(data["cells"], data["wall_s"], data["seed"]))
        return 0
    t0 = time.perf_counter()
    base = load_config(CONFIG)
    if args.seed is not None:
        base = apply_overrides(base, [f"seed={args.seed}"])
    workloads = [*CLOSED, *OPEN, "burst"]
    if args.quick:
        workloads = ["seed", "len20", "poisson100"]
    cells: dict[str, dict[str, Any]] = {}
    for ranks in args.ranks:
        capacity = capacity_req_s(base, ranks)
        for wl in workloads if ranks < 64 else [w for w in workloads if w in args.workloads_64]:
            cfg = _cell_config(base, ranks, wl, capacity)
            raw = {}
            for label, name, params in POLICIES:
                raw[label] = simulate(cfg, make_policy(name, **params), record_rank_time=False).metrics()
            b = raw["off"]
            rel = {
                label: {
                    "thpt": _rel(m, b, "output_tok_s"),
                    "tpot": _rel(m, b, "mean_tpot_ms"),
                    "ttft": _rel(m, b, "mean_ttft_ms"),
                    "p99_ttft": _rel(m, b, "p99_ttft_ms"),
                }
                for label, m in raw.items()
            }
            key = f"{ranks}x{wl}"
            cells[key] = {
                "ranks": ranks,
                "workload": wl,
                "requests": cfg.workload.num_requests,
                "capacity_req_s": capacity,
                "metrics": raw,
                "vs_off": rel,
                "beats_frontier": {
                    lab: _beats(rel, lab) for lab, _, _ in POLICIES if lab.startswith("bounded")
                },
            }
            d = rel[DEFAULT]
            print(
                f"{key:>16}: {DEFAULT} thpt {100 * d['thpt']:+.1f} % ttft {100 * d['ttft']:+.1f} % "
                f"p99 {100 * d['p99_ttft']:+.1f} % | any_at_cap {100 * rel['any_at_cap']['thpt']:+.1f} % / "
                f"{100 * rel['any_at_cap']['ttft']:+.1f} % | beats frontier {cells[key]['beats_frontier'][DEFAULT]} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"),
        {
            "policies": [{"label": lab, "name": n, "params": p} for lab, n, p in POLICIES],
            "frontier": sorted(FRONTIER),
            "default": DEFAULT,
            "seed": base.seed,
            "cells": cells,
            "wall_s": wall,
        },
    )
    out.with_suffix(".md").write_text(render(cells, wall, base.seed))
    print(f"wrote {out}.json/.md in {wall:.0f} s")
    return 0


def render(cells: dict[str, dict[str, Any]], wall: float, seed: int) -> str:
    """Markdown: the Done-means check, then one table per DP size (gain vs off, TTFT increase vs off)."""
    md = [
        "# Gate matrix in `dpserve sim` (DeepSeek-V3 calibrated costs, max_num_seqs 32 per rank)",
        "",
        "Generated by `benchmarks/sim_gate_matrix.py`. Each entry is `output throughput / mean TTFT / p99 TTFT`"
        " change against `off` in the same cell (same requests, same arrival times). `*` marks a `bounded_hold`"
        " entry that no frontier point (`off`, `any_at_cap`, `cadence` 1-16) dominates (at least as much"
        " throughput at no more mean TTFT, or lower mean TTFT at no less throughput; differences under 0.5"
        " percentage point are ties).",
        "",
        f"Simulator seed {seed} (`--seed`): it draws the requests, their arrival times and the expert loads;"
        " every policy in a cell runs on the same draws.",
        "",
    ]
    done = [c for c in cells.values() if c["ranks"] == 16 and c["workload"] == "len20"]
    worst = min((c["vs_off"][DEFAULT]["thpt"], k) for k, c in cells.items())
    beaten = [k for k, c in cells.items() if not c["beats_frontier"][DEFAULT]]
    md.append(
        "## Targets for the default (`bounded_hold`, max_hold_steps 8, quorum 0.5, min_occupancy 0.9,"
        " queue_hold_factor 4, load_queue_share 0.05)"
    )
    md.append("")
    if done:
        d = done[0]["vs_off"][DEFAULT]
        ok = target_met(d)
        md.append(
            f"- 16 ranks, +-20 % lengths, concurrency = slots: throughput {100 * d['thpt']:+.1f} %, mean TTFT "
            f"{100 * d['ttft']:+.1f} % (target >= +30 % at <= +10 %): {'met' if ok else 'NOT met'}."
        )
    md.append(
        f"- Worst throughput against `off` over the matrix: {100 * worst[0]:+.1f} % ({worst[1]}; target: never"
        f" below -2 %): {'met' if worst[0] >= -0.02 else 'NOT met'}."
    )
    md.append(
        f"- Beats the cadence/any_at_cap frontier in {len(cells) - len(beaten)} of {len(cells)} cells"
        + (f"; not in: {', '.join(beaten)}." if beaten else ".")
    )
    md.append("")
    labels = [lab for lab, _, _ in POLICIES if lab != "off"]
    for ranks in sorted({c["ranks"] for c in cells.values()}):
        rows = [c for c in cells.values() if c["ranks"] == ranks]
        md += [
            f"## {ranks} ranks ({ranks * SEQS} slots)",
            "",
            "| workload | off tok/s | off TTFT ms | " + " | ".join(labels) + " |",
            "|---" * (len(labels) + 3) + "|",
        ]
        for c in rows:
            off = c["metrics"]["off"]
            ents = []
            for lab in labels:
                r = c["vs_off"][lab]
                star = "*" if c["beats_frontier"].get(lab) else ""
                ents.append(f"{100 * r['thpt']:+.0f}/{100 * r['ttft']:+.0f}/{100 * r['p99_ttft']:+.0f}{star}")
            md.append(
                f"| {c['workload']} ({c['requests']} req) | {off['output_tok_s']:.0f} | {off['mean_ttft_ms']:.0f} | "
                + " | ".join(ents)
                + " |"
            )
        md.append("")
    md.append(f"Wall time: {wall:.0f} s.")
    md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
