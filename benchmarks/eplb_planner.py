"""EPLB planner benchmark at DeepSeek-V3 scale (256 routed experts, 58 MoE layers).

For EP 32/64/128 with as many redundant slots, and skewed synthetic loads (Zipf-like, exponent drawn
per layer, log-normal noise, experts shuffled per layer; seeded), every policy is run side by side:

  cold:   current = default_placement (what ranks load at start-up) -> planning time (median of
          --repeats, one thread), mean imbalance before/after, slot moves vs current;
  steady: current = the policy's own plan for the cold loads, loads then drift (each expert x
          log-normal(0, --drift)) -> imbalance before/after and moves for one more rebalance step,
          which is what a running server pays every rebalance interval.

The hierarchical variant uses DeepSeek-V3's 8 expert groups and 8 ranks per node (num_nodes = EP / 8,
capped at 8 because groups must divide over nodes).

    .venv/bin/python benchmarks/eplb_planner.py [--out-dir benchmarks/results] [--repeats 5]
"""

from __future__ import annotations

import os

# One thread everywhere: the planner runs on a spare CPU core next to serving.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from eplb.policies import default_placement, rebalance  # noqa: E402
from eplb.stats import count_moves, imbalance  # noqa: E402

NUM_LAYERS = 58
NUM_LOGICAL = 256
NUM_GROUPS = 8
RANKS_PER_NODE = 8
CONFIGS = [(32, 32), (64, 64), (128, 128)]  # (EP ranks, redundant slots)
POLICY_NAMES = ["deepseek_global", "deepseek_hierarchical", "swift"]


def synthetic_load(num_layers: int, num_logical: int, seed: int, tokens: float = 1e5) -> np.ndarray:
    """Skewed loads float [num_layers, num_logical]: per layer, Zipf exponent in [0.3, 0.9], noise, shuffle."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_logical + 1)
    out = np.empty((num_layers, num_logical))
    for layer in range(num_layers):
        s = rng.uniform(0.3, 0.9)
        base = ranks**-s * rng.lognormal(0.0, 0.3, num_logical)
        out[layer] = rng.permutation(base)
    return np.round(out / out.sum(axis=1, keepdims=True) * tokens)


def drifted(load: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The same loads a while later: each expert's count scaled by log-normal(0, sigma) noise."""
    rng = np.random.default_rng(seed)
    return np.round(load * rng.lognormal(0.0, sigma, load.shape))


def policy_kwargs(policy: str, num_ranks: int) -> dict:
    """Node/group arguments per policy (only the hierarchical one uses them)."""
    if policy == "deepseek_hierarchical":
        # Groups must divide over nodes: beyond 8 nodes, count 8 "nodes" of more ranks each.
        return {"num_nodes": min(num_ranks // RANKS_PER_NODE, NUM_GROUPS), "num_groups": NUM_GROUPS}
    return {}


def bench_one(
    policy: str, load: np.ndarray, later: np.ndarray, num_ranks: int, num_redundant: int, repeats: int
) -> dict:
    """Cold and steady-state numbers for one policy and one EP configuration."""
    kw = policy_kwargs(policy, num_ranks)
    current = default_placement(NUM_LAYERS, NUM_LOGICAL, num_ranks, num_redundant)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        placement = rebalance(policy, load, num_ranks, num_redundant, current=current, **kw)
        times.append((time.perf_counter() - t0) * 1e3)
    cold = placement.phy2log
    steady = rebalance(policy, later, num_ranks, num_redundant, current=cold, **kw).phy2log
    num_phys = NUM_LOGICAL + num_redundant
    return {
        "policy": policy,
        "num_ranks": num_ranks,
        "num_redundant": num_redundant,
        **kw,
        "planning_ms_median": round(statistics.median(times), 2),
        "planning_ms_all": [round(t, 2) for t in times],
        "cold": {
            "imbalance_before": round(float(imbalance(load, current, num_ranks).mean()), 4),
            "imbalance_after": round(float(imbalance(load, cold, num_ranks).mean()), 4),
            "moves": count_moves(current, cold),
            "moves_fraction": round(count_moves(current, cold) / (NUM_LAYERS * num_phys), 4),
        },
        "steady": {
            "imbalance_before": round(float(imbalance(later, cold, num_ranks).mean()), 4),
            "imbalance_after": round(float(imbalance(later, steady, num_ranks).mean()), 4),
            "moves": count_moves(cold, steady),
        },
    }


def markdown(results: list[dict], meta: dict) -> str:
    """Short markdown report with one table row per (EP, policy)."""
    lines = [
        "# EPLB planner benchmark",
        "",
        f"DeepSeek-V3 scale: {NUM_LOGICAL} logical experts, {NUM_LAYERS} MoE layers; synthetic Zipf-like loads "
        f"(seed {meta['seed']}), steady state = loads drifted by log-normal sigma {meta['drift']}. "
        f"Planning time: median of {meta['repeats']} runs, one thread, {meta['cpu']}. "
        "Imbalance = max/mean rank load, mean over layers. Moves = physical slots whose expert changes "
        "(cold: vs the default identity placement; steady: vs the policy's own previous plan). "
        f"Hierarchical: {NUM_GROUPS} groups, num_nodes = min(EP / {RANKS_PER_NODE}, {NUM_GROUPS}).",
        "",
        "| EP | redundant | policy | plan ms | cold imbalance | cold moves | steady imbalance | steady moves |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c, s = r["cold"], r["steady"]
        lines.append(
            f"| {r['num_ranks']} | {r['num_redundant']} | {r['policy']} | {r['planning_ms_median']:.1f} | "
            f"{c['imbalance_before']:.3f} → {c['imbalance_after']:.3f} | {c['moves']} | "
            f"{s['imbalance_before']:.3f} → {s['imbalance_after']:.3f} | {s['moves']} |"
        )
    lines += ["", "swift vs deepseek_global (cold start):", ""]
    by = {(r["num_ranks"], r["policy"]): r for r in results}
    for num_ranks, _ in CONFIGS:
        ds, sw = by.get((num_ranks, "deepseek_global")), by.get((num_ranks, "swift"))
        if ds and sw:
            d_imb = (sw["cold"]["imbalance_after"] / ds["cold"]["imbalance_after"] - 1) * 100
            ratio = sw["cold"]["moves"] / max(ds["cold"]["moves"], 1)
            lines.append(f"- EP {num_ranks}: imbalance {d_imb:+.2f} %, moves x{ratio:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--drift", type=float, default=0.2, help="log-normal sigma of the steady-state load drift"
    )
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)  # not used by the planner, but keep any import-time pools quiet
    except ImportError:
        pass

    load = synthetic_load(NUM_LAYERS, NUM_LOGICAL, args.seed)
    later = drifted(load, args.drift, args.seed + 1)
    results = []
    for num_ranks, num_redundant in CONFIGS:
        for policy in POLICY_NAMES:
            r = bench_one(policy, load, later, num_ranks, num_redundant, args.repeats)
            results.append(r)
            print(
                f"EP{num_ranks:<4} {policy:22s} {r['planning_ms_median']:7.1f} ms  cold "
                f"{r['cold']['imbalance_before']:.3f}->{r['cold']['imbalance_after']:.3f} moves {r['cold']['moves']:6d}  "
                f"steady {r['steady']['imbalance_before']:.3f}->{r['steady']['imbalance_after']:.3f} moves {r['steady']['moves']}",
                flush=True,
            )
    meta = {
        "num_layers": NUM_LAYERS,
        "num_logical": NUM_LOGICAL,
        "seed": args.seed,
        "drift": args.drift,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "eplb_planner.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
    )
    (args.out_dir / "eplb_planner.md").write_text(markdown(results, meta))
    print(f"wrote {args.out_dir / 'eplb_planner.json'} and {args.out_dir / 'eplb_planner.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
