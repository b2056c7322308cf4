"""`dpserve eplb ...`: offline expert-placement tools.

    dpserve eplb plan --loads LOADS.npy --num-ranks R --num-redundant K [--num-nodes N] [--num-groups G]
                      [--policy deepseek|swift|...] [--current PLAN.json] [--param key=value ...] --out PLAN.json

LOADS.npy: float [layers, logical_experts]. PLAN.json holds "phy2log" plus the inputs and stats; a
PLAN.json (or a .npy phy2log) can be fed back as --current to plan the next step movement-aware.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from eplb.plan import PlanError
from eplb.policies import POLICIES, default_placement, rebalance
from eplb.stats import count_moves, imbalance


class UsageError(Exception):
    """A user-facing input problem: printed without a traceback, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `plan` action under `dpserve eplb`."""
    sub = parser.add_subparsers(dest="eplb_action", metavar="<action>")
    p = sub.add_parser(
        "plan",
        help="plan an expert placement from recorded loads",
        description="Plan an expert placement (phy2log table) from per-layer expert loads.",
    )
    p.add_argument("--loads", required=True, type=Path, help="LOADS.npy, float [layers, logical_experts]")
    p.add_argument("--num-ranks", required=True, type=int, help="expert-parallel ranks (EP size)")
    p.add_argument("--num-redundant", required=True, type=int, help="redundant expert slots in total")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes, for the hierarchical policy (default 1)")
    p.add_argument(
        "--num-groups", type=int, default=1, help="expert groups, for the hierarchical policy (default 1)"
    )
    p.add_argument(
        "--policy", default="deepseek", choices=sorted(POLICIES), help="placement policy (default deepseek)"
    )
    p.add_argument(
        "--current",
        type=Path,
        help="placement the ranks hold now: PLAN.json or phy2log .npy (default: identity)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy parameter, repeatable (swift: threshold, target, min_gain, max_pair_moves, ...)",
    )
    p.add_argument("--out", required=True, type=Path, help="where to write PLAN.json")


def _load_loads(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"loads file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad file; all mean the same here
        raise UsageError(f"cannot read {path} as a .npy array: {exc}") from exc
    if arr.ndim != 2:
        raise UsageError(f"{path}: loads must be 2-D [layers, logical_experts], got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise UsageError(f"{path}: loads must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _load_current(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"current placement file not found: {path}")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"cannot read {path} as a .npy array: {exc}") from exc
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path} as JSON: {exc}") from exc
    table = data.get("phy2log") if isinstance(data, dict) else data
    if table is None:
        raise UsageError(f"{path}: no 'phy2log' key")
    try:
        arr = np.asarray(table)
    except ValueError as exc:
        raise UsageError(f"{path}: phy2log is not a rectangular table: {exc}") from exc
    if arr.dtype == object:
        raise UsageError(f"{path}: phy2log is not a rectangular table of integers")
    return arr


def _parse_params(items: list[str]) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            value: object = json.loads(raw)  # numbers, true/false, null
        except json.JSONDecodeError:
            value = raw
        params[key.replace("-", "_")] = value
    return params


def plan_command(args: argparse.Namespace) -> dict:
    """Run `eplb plan`; returns the PLAN.json document (also written to args.out)."""
    load = _load_loads(args.loads)
    layers, num_logical = load.shape
    num_phys = num_logical + args.num_redundant
    if args.num_ranks < 1:
        raise UsageError(f"--num-ranks must be >= 1, got {args.num_ranks}")
    if args.num_redundant < 0:
        raise UsageError(f"--num-redundant must be >= 0, got {args.num_redundant}")
    if num_phys % args.num_ranks:
        raise UsageError(
            f"--num-ranks {args.num_ranks} does not divide {num_logical} experts + {args.num_redundant} redundant = {num_phys} slots"
        )
    current = _load_current(args.current) if args.current else None
    if current is not None and current.shape != (layers, num_phys):
        raise UsageError(
            f"--current has shape {current.shape}, expected {(layers, num_phys)} to match the loads"
        )
    params = _parse_params(args.param)
    baseline = (
        current
        if current is not None
        else default_placement(layers, num_logical, args.num_ranks, args.num_redundant)
    )

    t0 = time.perf_counter()
    try:
        placement = rebalance(
            args.policy,
            load,
            args.num_ranks,
            args.num_redundant,
            num_nodes=args.num_nodes,
            num_groups=args.num_groups,
            current=current,
            **params,
        )
    except TypeError as exc:  # unknown --param for this policy
        raise UsageError(f"bad --param for policy {args.policy}: {exc}") from exc
    planning_ms = (time.perf_counter() - t0) * 1e3

    before = imbalance(load, baseline.astype(np.int64), args.num_ranks)
    after = imbalance(load, placement.phy2log, args.num_ranks)
    doc = {
        "phy2log": placement.phy2log.tolist(),
        "policy": args.policy,
        "num_ranks": args.num_ranks,
        "num_redundant": args.num_redundant,
        "num_nodes": args.num_nodes,
        "num_groups": args.num_groups,
        "num_logical": num_logical,
        "params": params,
        "stats": {
            "imbalance_before": float(before.mean()),
            "imbalance_after": float(after.mean()),
            "imbalance_before_per_layer": [round(float(x), 6) for x in before],
            "imbalance_after_per_layer": [round(float(x), 6) for x in after],
            "moves": count_moves(baseline, placement.phy2log),
            "moves_relative_to": "current" if current is not None else "default_placement",
            "planning_ms": round(planning_ms, 3),
        },
    }
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc}") from exc
    return doc


def run(args: argparse.Namespace) -> int:
    """Entry point called by cluster/cli.py; returns the exit code (2 for any input error)."""
    if getattr(args, "eplb_action", None) != "plan":
        print(
            "usage: dpserve eplb plan --loads LOADS.npy --num-ranks R --num-redundant K --out PLAN.json",
            file=sys.stderr,
        )
        return 2
    try:
        doc = plan_command(args)
    except (UsageError, PlanError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dpserve eplb plan: error: {msg}", file=sys.stderr)
        return 2
    s = doc["stats"]
    print(
        f"{doc['policy']}: imbalance {s['imbalance_before']:.3f} -> {s['imbalance_after']:.3f} (mean over "
        f"{len(s['imbalance_after_per_layer'])} layers), {s['moves']} slot moves, {s['planning_ms']:.1f} ms -> {args.out}"
    )
    return 0
