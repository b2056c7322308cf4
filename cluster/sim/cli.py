"""`dpserve sim`: run the lockstep simulator for one or more gate policies and report.

Examples::

    dpserve sim                                   # calibrated DeepSeek-V3 config, its policies
    dpserve sim --policies off any_at_cap --ranks 64 --requests 10000 --set cluster.max_num_seqs=32
    dpserve sim --eplb deepseek --set experts.num_redundant=32 --out benchmarks/results/mine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cluster.sim.config import SimConfig, apply_overrides, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "ray_configs" / "sim-deepseek-v3.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `dpserve sim`'s options."""
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None,
        help="YAML config (default: ray_configs/sim-deepseek-v3.yaml)",
    )
    parser.add_argument("--policies", nargs="+", help="gate policies to compare (default: the config's list)")
    parser.add_argument("--ranks", type=int, help="number of DP ranks (cluster.num_ranks)")
    parser.add_argument("--requests", type=int, help="number of requests (workload.num_requests)")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="client max concurrency (default: the config's; 0 = unlimited)",
    )
    parser.add_argument("--eplb", help="EPLB policy from eplb.policies, or 'none' (eplb.policy)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--loads",
        metavar="FILE.npy",
        help="drive expert routing with a recorded load trace instead of the synthetic model: float "
        "[layers, experts] as `dpserve eplb plan --loads` takes, or [windows, layers, experts] (experts.loads_file)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config value, e.g. --set costs.step_overhead_s=0.02 (repeatable)",
    )
    parser.add_argument("--out", help="write <out>.json, <out>.md and PNG plots with this path prefix")
    parser.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def build_config(args: argparse.Namespace) -> SimConfig:
    """The config from --config plus the shortcut options and --set overrides."""
    cfg = load_config(args.config)
    overrides = list(args.overrides)
    if args.ranks is not None:
        overrides.append(f"cluster.num_ranks={args.ranks}")
    if args.requests is not None:
        overrides.append(f"workload.num_requests={args.requests}")
    if args.concurrency is not None:
        overrides.append(f"workload.max_concurrency={args.concurrency or 'null'}")
    if args.eplb is not None:
        overrides.append(f"eplb.policy={args.eplb}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "loads", None) is not None:
        overrides.append(f"experts.loads_file={json.dumps(str(args.loads))}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def run(args: argparse.Namespace) -> int:
    """Run every requested policy, print the table (or JSON), optionally write files."""
    # Imported here so `dpserve --help` does not pay for numpy/matplotlib.
    from cluster.sim.engine import simulate
    from cluster.sim.report import gain, plot, table, write_json

    try:
        cfg = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"dpserve sim: {exc}", file=sys.stderr)
        return 2
    policies = args.policies or cfg.gate.policies
    results = []
    try:
        for name in policies:
            results.append(simulate(cfg, name))
    except (ValueError, RuntimeError) as exc:
        print(f"dpserve sim: {exc}", file=sys.stderr)
        return 2
    metrics = {r.policy: r.metrics() for r in results}
    payload = {
        "config": dataclasses.asdict(cfg),
        "results": metrics,
        "gain_vs_off": {
            p: gain(m, metrics["off"]) for p, m in metrics.items() if "off" in metrics and p != "off"
        },
        "notes": sorted({n for r in results for n in r.notes}),
    }
    rows = dict(metrics)
    for label, ref in (cfg.reference or {}).items():
        if isinstance(ref, dict):
            rows[f"seed {label} (measured)"] = ref
    text = table(rows, extra=[("prefill_step_frac", "steps w/ prefill", "{:.3f}")])
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(
            f"{cfg.model.name}: {cfg.cluster.num_ranks} ranks x max_num_seqs {cfg.cluster.max_num_seqs}, "
            f"{cfg.workload.num_requests} requests, EPLB {cfg.eplb.policy}"
        )
        print(text)
        for p, g in payload["gain_vs_off"].items():
            print(
                f"{p} vs off: output throughput {100 * g['output_tok_s']:+.1f} %, TPOT {100 * g['mean_tpot_ms']:+.1f} %, "
                f"TTFT {100 * g['mean_ttft_ms']:+.1f} %"
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), payload)
        out.with_suffix(".md").write_text(text + "\n")
        if not args.no_plots:
            plot(results, out, title=cfg.model.name)
    return 0
