"""Why `cadence` 2 cuts mean TTFT in the gate matrix's fixed-length cells, and a rule that tries to do the same.

Writes benchmarks/results/sim_gate_seed_trace.{json,md}. Two parts, both on the cells of
`benchmarks/sim_gate_matrix.py` (same config, same cell definitions, same frontier test):

1. **Trace** of the ``seed`` workload (fixed 3500 / 1500 lengths, concurrency = slots) at 4 and 16 ranks
   under `off`, `cadence` 2 and `bounded_hold` (default): mean TTFT per wave of ``slots`` requests (in
   send order), and for the requests after the first wave the TTFT split into *send -> join* (from the
   client's send to the end of the step the request arrives in, when it joins the rank's waiting
   queue) and *join -> first token*, with how many of those steps are long. A step is *long* when it
   takes over 1 s: a step whose ranks admit new prompts up to the token budget (about 1.5 s); a
   decode-only step takes about 0.08 s and a step that only finishes a chunked prompt's tail about 0.3 s.
2. **An admission grid** for `bounded_hold` (experimental, defined here, not in `scheduler.policy`):
   off the grid (``step % 2 != 0``) the quorum (rule 3) never opens; the saturation guard (rule 4)
   still opens there (``guard_on_grid`` false) or only on the grid too (true). The hold bound (8) is a
   multiple of 2, so it opens on the grid anyway. Each variant runs on the fixed-length and
   closed-loop cells and on Poisson 50 % (where the guard decides), against the same frontier as the
   matrix.

Run: nice -n 19 .venv/bin/python benchmarks/sim_gate_seed_trace.py [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sim_gate_matrix import CONFIG, FRONTIER, POLICIES, SEQS, _beats, _cell_config  # noqa: E402
from cluster.sim import load_config, simulate  # noqa: E402
from cluster.sim.config import apply_overrides  # noqa: E402
from cluster.sim.engine import SimResult  # noqa: E402
from cluster.sim.report import write_json  # noqa: E402
from scheduler.policy import BoundedHold, GateDecision, GroupLoad, RankCounts, make_policy  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "sim_gate_seed_trace"
LONG_S = 1.0  # a step over this admits new prompts up to the budget (module docstring)
GRID_CELLS = ["4xseed", "16xseed", "4xlen10", "4xlen20", "4xlen30", "16xlen20", "4xpoisson50", "16xpoisson50"]


@dataclass(frozen=True)
class GridHold(BoundedHold):
    """`BoundedHold` whose quorum (and, with ``guard_on_grid``, saturation guard) opens only on steps
    that are a multiple of ``grid``: the step after an admitting step then runs only the tails of the
    prompts it chunked, a short step, as under `cadence` 2."""

    grid: int = 2
    guard_on_grid: bool = False

    def decide(self, counts: Sequence[RankCounts], step: int, load: GroupLoad | None = None) -> GateDecision:
        d = BoundedHold.decide(self, counts, step, load)
        if not counts or not d.admit or step % self.grid == 0 or d.reason.startswith("hold bound"):
            return d
        running = sum(c.running for c in counts)
        slots = sum(c.max_num_seqs for c in counts)
        if not self.guard_on_grid and running < self.min_occupancy * slots:
            return GateDecision(step=step, admit=True, reason="saturation guard (off the grid)")
        return GateDecision(step=step, admit=False, reason=f"off the {self.grid}-step admission grid")


VARIANTS: list[tuple[str, BoundedHold]] = [
    ("bounded_hold", BoundedHold()),
    ("grid2", GridHold(grid=2)),
    ("grid2_guard", GridHold(grid=2, guard_on_grid=True)),
]


def trace(r: SimResult, slots: int, delay_s: float) -> dict[str, Any]:
    """Per-wave TTFT and the later waves' TTFT split (module docstring, part 1)."""
    ttft = r.first_t - r.send_t
    end = r.step_start + r.step_time
    later = np.arange(len(ttft)) >= slots
    arrive = r.send_t + delay_s
    k_arrive = np.searchsorted(r.step_start, arrive, side="right") - 1  # step the request arrives in
    k_first = np.searchsorted(end, r.first_t - 1e-9, side="left")  # step its prefill completes in
    long = r.step_time > LONG_S
    long_after = np.array(
        [long[a + 1 : f + 1].sum() for a, f in zip(k_arrive[later], k_first[later], strict=True)]
    )
    m = r.metrics()
    return {
        "output_tok_s": m["output_tok_s"],
        "mean_ttft_ms": m["mean_ttft_ms"],
        "duration_s": m["duration_s"],
        "wave_ttft_ms": [float(1e3 * ttft[i : i + slots].mean()) for i in range(0, len(ttft), slots)],
        "later_ttft_s": float(ttft[later].mean()),
        "later_send_to_join_s": float((end[k_arrive] - r.send_t)[later].mean()),
        "later_join_to_first_s": float((r.first_t - end[k_arrive])[later].mean()),
        "later_steps_after_join": float((k_first - k_arrive)[later].mean()),
        "later_long_steps_after_join": float(long_after.mean()),
        "later_arrive_in_long_share": float(long[k_arrive[later]].mean()),
        "long_step_s": float(r.step_time[long].mean()),
        "short_prefill_step_s": float(r.step_time[(r.prefill_tokens > 0) & ~long].mean())
        if ((r.prefill_tokens > 0) & ~long).any()
        else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = apply_overrides(load_config(CONFIG), [f"seed={args.seed}"])
    traces: dict[str, dict[str, Any]] = {}
    for ranks in (4, 16):
        cfg = _cell_config(base, ranks, "seed", None)
        for label, policy in [("off", "off"), ("cadence2", make_policy("cadence", interval=2))]:
            r = simulate(cfg, policy, record_rank_time=False)
            traces[f"{ranks}x{label}"] = trace(r, ranks * SEQS, cfg.workload.client_delay_s)
        r = simulate(cfg, BoundedHold(), record_rank_time=False)
        traces[f"{ranks}xbounded_hold"] = trace(r, ranks * SEQS, cfg.workload.client_delay_s)
        print(f"trace {ranks} ranks done ({time.perf_counter() - t0:.0f} s)", flush=True)
    frontier = [(lab, n, p) for lab, n, p in POLICIES if lab in FRONTIER]
    capacity: dict[int, float] = {}
    cells: dict[str, dict[str, Any]] = {}
    for key in GRID_CELLS:
        ranks, wl = int(key.split("x")[0]), key.split("x")[1]
        if ranks not in capacity:
            cap_cfg = _cell_config(base, ranks, "len20", None)
            capacity[ranks] = simulate(cap_cfg, "off", record_rank_time=False).metrics()["request_s"]
        cfg = _cell_config(base, ranks, wl, capacity[ranks])
        raw = {
            lab: simulate(cfg, make_policy(n, **p), record_rank_time=False).metrics()
            for lab, n, p in frontier
        }
        for lab, pol in VARIANTS:
            raw[lab] = simulate(cfg, pol, record_rank_time=False).metrics()
        b = raw["off"]
        rel = {
            lab: {
                "thpt": m["output_tok_s"] / b["output_tok_s"] - 1.0,
                "ttft": m["mean_ttft_ms"] / b["mean_ttft_ms"] - 1.0,
            }
            for lab, m in raw.items()
        }
        cells[key] = {"vs_off": rel, "beats_frontier": {lab: _beats(rel, lab) for lab, _ in VARIANTS}}
        print(f"grid {key} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"), {"seed": base.seed, "traces": traces, "cells": cells, "wall_s": wall}
    )
    out.with_suffix(".md").write_text(render(traces, cells, base.seed, wall))
    print(f"wrote {out}.json/.md in {wall:.0f} s")
    return 0


def render(
    traces: dict[str, dict[str, Any]], cells: dict[str, dict[str, Any]], seed: int, wall: float
) -> str:
    """Markdown: the trace table, then the grid variants against the frontier."""
    md = [
        "# Fixed-length cells of the gate matrix: trace, and an admission grid for `bounded_hold`",
        "",
        f"Generated by `benchmarks/sim_gate_seed_trace.py` (simulator seed {seed}); the cells and the frontier"
        " test are those of `sim_gate_matrix.py`. Times in seconds unless marked.",
        "",
        "## Trace of the `seed` workload (fixed lengths, concurrency = slots)",
        "",
        "Later waves: requests sent after the first wave of `slots` requests. A long step takes over 1 s.",
        "",
        "| cell | policy | output tok/s | mean TTFT ms | TTFT ms per wave | later: TTFT | send -> join |"
        " join -> first token | steps after join (long) | arrive in a long step | long step | short prefill step |",
        "|---" * 12 + "|",
    ]
    for key, t in traces.items():
        ranks, policy = key.split("x", 1)
        waves = " / ".join(f"{w:.0f}" for w in t["wave_ttft_ms"])
        md.append(
            f"| {ranks} ranks | {policy} | {t['output_tok_s']:.1f} | {t['mean_ttft_ms']:.0f} | {waves} |"
            f" {t['later_ttft_s']:.3f} | {t['later_send_to_join_s']:.3f} | {t['later_join_to_first_s']:.3f} |"
            f" {t['later_steps_after_join']:.2f} ({t['later_long_steps_after_join']:.2f}) |"
            f" {100 * t['later_arrive_in_long_share']:.0f} % | {t['long_step_s']:.3f} |"
            f" {t['short_prefill_step_s']:.3f} |"
        )
    labels = [lab for lab, _ in VARIANTS]
    md += [
        "",
        "## Admission grid of 2 steps for `bounded_hold`",
        "",
        "Output throughput / mean TTFT change against `off` in the same cell; `*`: no frontier point"
        " (`off`, `any_at_cap`, `cadence` 1-16) dominates it (`sim_gate_matrix.py`'s test). `grid2`: the"
        " quorum opens only on even steps, the saturation guard on any step; `grid2_guard`: both only on"
        " even steps.",
        "",
        "| cell | cadence2 | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for key, c in cells.items():
        ents = []
        for lab in ["cadence2", *labels]:
            r = c["vs_off"][lab]
            star = "*" if c["beats_frontier"].get(lab) else ""
            ents.append(f"{100 * r['thpt']:+.1f} / {100 * r['ttft']:+.1f}{star}")
        md.append(f"| {key} | " + " | ".join(ents) + " |")
    md += ["", f"Wall time: {wall:.0f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
