"""bounded_hold with a busy signal from the counts' history (#17): the cells the default misses, and the ones
it must keep (writes benchmarks/results/sim_gate_load_signal.*).

The default `bounded_hold` misses the cadence/any_at_cap frontier in the overload cells (module docstring
of `scheduler.policy`; `sim_gate_matrix_note.md`). This runs the opt-in busy signals of `scheduler.policy`
(``load_prefill_share``: the share of recent steps with an admission; ``load_arrival_rate``: arrivals per
step per rank, both derived by `LoadWindow` from the changes between snapshots) against the default on:
16 ranks len20 (the target cell), 4 and 16 ranks Poisson 50/80/100/120 %, 64 ranks Poisson 100 %, at
seeds 0 and 1.

Cells and metrics are those of `benchmarks/sim_gate_matrix.py` (its `_cell_config`, `_beats`, `POLICIES`).
`off`, the frontier and the default come from the committed matrix for that seed
(`sim_gate_matrix.json`, `sim_gate_matrix_seed1.json`) once `off` and the default, rerun here, give the
committed metrics exactly (the simulator is deterministic); a cell where they differ reruns every
matrix policy. Each variant's run also records the busy signals it read and the share of decided steps
it was busy.

Run: nice -n 19 flock /tmp/dpserve-heavy.lock .venv/bin/python benchmarks/sim_gate_load_signal.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from sim_gate_matrix import (  # noqa: E402
    CONFIG,
    DEFAULT,
    FRONTIER,
    OUT,
    POLICIES,
    _beats,
    _cell_config,
    _rel,
    capacity_req_s,
    target_met,
)

from cluster.sim import load_config, simulate  # noqa: E402
from cluster.sim.config import apply_overrides  # noqa: E402
from cluster.sim.report import write_json  # noqa: E402
from scheduler.policy import GateDecision, GatePolicy, GroupLoad, RankCounts, make_policy  # noqa: E402

CELLS = [
    (16, "len20"),
    *[(r, w) for r in (4, 16) for w in ("poisson50", "poisson80", "poisson100", "poisson120")],
    (64, "poisson100"),
]
MATRIX = {0: OUT / "sim_gate_matrix.json", 1: OUT / "sim_gate_matrix_seed1.json"}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("bh_pf10", {"load_prefill_share": 0.10}),
    ("bh_ar16", {"load_arrival_rate": 0.016}),
    ("bh_pf10_ar12", {"load_prefill_share": 0.10, "load_arrival_rate": 0.012}),
]
SAME = ("output_tok_s", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "steps")


class _Recording:
    """A policy that records the load it reads and how often it was busy, then decides as ``inner``."""

    def __init__(self, inner: GatePolicy) -> None:
        self.inner = inner
        self.name = inner.name
        self.decided = self.busy = 0
        self.admitted_share = self.arrival_rate = 0.0

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
        d = self.inner.decide(counts, step, load)
        if counts and load is not None:
            self.decided += 1
            self.busy += "; busy:" in d.reason
            self.admitted_share += load.admitted_share
            self.arrival_rate += load.arrival_rate / len(counts)
        return d

    def summary(self) -> dict[str, float]:
        n = max(1, self.decided)
        return {
            "busy_share": self.busy / n,
            "mean_admitted_share": self.admitted_share / n,
            "mean_arrivals_per_rank_step": self.arrival_rate / n,
        }


def _run(cfg: Any, name: str, params: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    rec = _Recording(make_policy(name, **params))
    m = simulate(cfg, rec, record_rank_time=False).metrics()
    return m, rec.summary()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=str(OUT / "sim_gate_load_signal"))
    ap.add_argument("--render-only", action="store_true", help="re-render <out>.md from <out>.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        out.with_suffix(".md").write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return 0
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for seed in args.seeds:
        # A seed without a committed matrix runs every matrix policy and measures capacity as the matrix does.
        committed = json.loads(MATRIX[seed].read_text())["cells"] if seed in MATRIX else {}
        capacity: dict[int, float] = {}
        base = apply_overrides(load_config(CONFIG), [f"seed={seed}"])
        for ranks, wl in CELLS:
            key = f"{ranks}x{wl}"
            old = committed.get(key)
            if ranks not in capacity:
                capacity[ranks] = old["capacity_req_s"] if old else capacity_req_s(base, ranks)
            cfg = _cell_config(base, ranks, wl, capacity[ranks])
            raw: dict[str, dict[str, float]] = {}
            signals: dict[str, dict[str, float]] = {}
            for label in ("off", DEFAULT):
                raw[label], signals[label] = _run(cfg, label, {})
            reused = old is not None and all(
                raw[lab][k] == old["metrics"][lab][k] for lab in raw for k in SAME
            )
            for label, name, params in POLICIES:
                if label in FRONTIER or label == DEFAULT:
                    if label not in raw:
                        raw[label] = old["metrics"][label] if old and reused else _run(cfg, name, params)[0]
            for label, params in VARIANTS:
                raw[label], signals[label] = _run(cfg, DEFAULT, params)
            rel = {
                lab: {
                    k: _rel(m, raw["off"], f) for k, f in (("thpt", "output_tok_s"), ("ttft", "mean_ttft_ms"))
                }
                for lab, m in raw.items()
            }
            results[f"{seed}:{key}"] = {
                "seed": seed,
                "ranks": ranks,
                "workload": wl,
                "frontier_from_matrix": reused,
                "metrics": raw,
                "vs_off": rel,
                "beats_frontier": {lab: _beats(rel, lab) for lab in (DEFAULT, *(v for v, _ in VARIANTS))},
                "signals": signals,
            }
            line = " | ".join(
                f"{lab} {100 * rel[lab]['thpt']:+.1f}/{100 * rel[lab]['ttft']:+.1f}"
                f"{'*' if results[f'{seed}:{key}']['beats_frontier'][lab] else ''}"
                for lab in (DEFAULT, *(v for v, _ in VARIANTS))
            )
            print(
                f"seed {seed} {key:>14}: {line} (reused {reused}, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    data = {
        "variants": [{"label": lab, "name": DEFAULT, "params": p} for lab, p in VARIANTS],
        "frontier": sorted(FRONTIER),
        "cells": results,
        "wall_s": wall,
    }
    write_json(out.with_suffix(".json"), data)
    out.with_suffix(".md").write_text(render(data))
    print(f"wrote {out}.json/.md in {wall:.0f} s")
    return 0


def render(data: dict[str, Any]) -> str:
    """Markdown: per seed, one row per cell (change against `off`), then the count of cells each beats."""
    labels = [DEFAULT, *(v["label"] for v in data["variants"])]
    params = "; ".join(
        f"`{v['label']}`: {', '.join(f'{k} {x}' for k, x in v['params'].items())}" for v in data["variants"]
    )
    md = [
        "# `bounded_hold` with a busy signal (#17), simulator",
        "",
        "Generated by `benchmarks/sim_gate_load_signal.py` (cells and frontier rule of `sim_gate_matrix.py`)."
        f" Variants: the default plus {params}; a busy group skips the saturation guard"
        ' (`scheduler/policy.py`, "Busy"). Each entry is `output throughput / mean TTFT`'
        " change against `off` in %; `*` marks an entry no frontier point dominates. `busy` is the share of"
        " decided steps the variant was busy; `adm` and `arr` are the busy signals the default read, averaged"
        " over its decided steps (share of steps with an admission; arrivals per step per rank x 1000).",
        "",
    ]
    cells = data["cells"]
    for seed in sorted({c["seed"] for c in cells.values()}):
        rows = [c for c in cells.values() if c["seed"] == seed]
        md += [
            f"## Seed {seed}",
            "",
            "| cell | off tok/s | off TTFT ms | adm | arr | "
            + " | ".join(labels)
            + " | "
            + " | ".join(f"{lab} busy" for lab in labels[1:])
            + " |",
            "|---" * (5 + 2 * len(labels) - 1) + "|",
        ]
        for c in rows:
            off = c["metrics"]["off"]
            sig = c["signals"][DEFAULT]
            ents = [
                f"{100 * c['vs_off'][lab]['thpt']:+.1f}/{100 * c['vs_off'][lab]['ttft']:+.1f}"
                + ("*" if c["beats_frontier"][lab] else "")
                for lab in labels
            ]
            busy = [f"{100 * c['signals'][lab]['busy_share']:.0f} %" for lab in labels[1:]]
            md.append(
                f"| {c['ranks']}x{c['workload']} | {off['output_tok_s']:.0f} | {off['mean_ttft_ms']:.0f} | "
                f"{sig['mean_admitted_share']:.3f} | {1000 * sig['mean_arrivals_per_rank_step']:.1f} | "
                + " | ".join(ents + busy)
                + " |"
            )
        md.append("")
        for lab in labels:
            won = [c for c in rows if c["beats_frontier"][lab]]
            worst = min((c["vs_off"][lab]["thpt"], f"{c['ranks']}x{c['workload']}") for c in rows)
            tgt = [c["vs_off"][lab] for c in rows if c["ranks"] == 16 and c["workload"] == "len20"]
            target = (
                f"target cell {100 * tgt[0]['thpt']:+.1f} / {100 * tgt[0]['ttft']:+.1f} % "
                f"({'met' if target_met(tgt[0]) else 'NOT met'})"
                if tgt
                else "target cell not run"
            )
            md.append(
                f"- `{lab}`: beats the frontier in {len(won)} of {len(rows)} cells; {target}; worst throughput"
                f" {100 * worst[0]:+.2f} % ({worst[1]})."
            )
        md.append("")
    seeds = sorted({c["seed"] for c in cells.values()})

    def won(lab: str, seed: int) -> int:
        return sum(1 for c in cells.values() if c["seed"] == seed and c["beats_frontier"][lab])

    md.append("## Against the default")
    md.append("")
    for lab in labels[1:]:
        more = all(won(lab, s) > won(DEFAULT, s) for s in seeds)
        floor = all(c["vs_off"][lab]["thpt"] >= -0.02 for c in cells.values())
        keep = all(
            target_met(c["vs_off"][lab])
            for c in cells.values()
            if c["ranks"] == 16 and c["workload"] == "len20"
        )
        counts = ", ".join(f"seed {s}: {won(lab, s)} against {won(DEFAULT, s)}" for s in seeds)
        md.append(
            f"- `{lab}`: beats the frontier in more cells than the default on every seed: {'yes' if more else 'no'}"
            f" ({counts}); target cell kept on every seed: {'yes' if keep else 'no'}; never below -2 % against"
            f" `off`: {'yes' if floor else 'no'}."
        )
    md += [
        "",
        "The thresholds were chosen from earlier runs of these cells at seeds 0 and 1: counts at those seeds"
        " are in sample, at any other seed out of sample.",
        "",
    ]
    reused = all(c["frontier_from_matrix"] for c in cells.values())
    md.append(
        "`off`, the frontier and the default come from the committed matrix of the same seed: `off` and the"
        " default rerun here gave its metrics exactly in every cell."
        if reused
        else "Cells with `frontier_from_matrix: false` in the JSON (all of them for a seed without a committed"
        " matrix) ran every matrix policy here."
    )
    md += ["", f"Wall time: {data['wall_s']:.0f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
