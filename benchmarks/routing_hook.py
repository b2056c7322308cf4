"""Cost of the EPLB routing hook (map logical -> physical ids + record per-expert and per-slot counts) per layer call.

Pure torch, no engine: the hook the applier installs on every MoE router, on batches of 1, 64 and 512
tokens with top-2 routing over 16 experts in 20 slots. Writes benchmarks/results/routing_hook.{json,md}.

    .venv/bin/python benchmarks/routing_hook.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from eplb.policies import placement_from_phy2log
from eplb.recorder import ExpertLoadRecorder
from eplb.slots import LayerRouting

RESULTS = Path(__file__).parent / "results"


def _hook(num_logical: int = 16, num_redundant: int = 4) -> LayerRouting:
    row = np.asarray([list(range(num_logical)) + list(range(num_redundant))])
    place = placement_from_phy2log(row, num_logical)
    cap = place.log2phy.shape[2]
    table = torch.full((num_logical, cap), -1, dtype=torch.int64)
    table[:, :cap] = torch.from_numpy(place.log2phy[0])
    rc = torch.from_numpy(place.replica_count[0].copy())
    return LayerRouting(0, ExpertLoadRecorder(1, num_logical, num_logical + num_redundant), table, rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    hook = _hook()
    sizes = (1, 64, 512)
    per_round: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):  # sizes interleaved within each round
        for n in sizes:
            ids = torch.randint(0, 16, (n, 2), dtype=torch.int32)
            hook(ids)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                hook(ids)
            per_round[n].append((time.perf_counter() - t0) / args.calls * 1e6)
    result = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "us_per_call": {str(n): {"median": statistics.median(v), "rounds": v} for n, v in per_round.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_hook.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# EPLB routing hook cost (record + map), per MoE layer call",
        "",
        f"torch {torch.__version__}, 1 thread, top-2 over 16 experts in 20 slots; median of {args.rounds} "
        f"rounds x {args.calls} calls.",
        "",
        "| tokens | us per call (median) | rounds min-max |",
        "|---|---|---|",
    ]
    for n, v in per_round.items():
        lines.append(f"| {n} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} |")
    (RESULTS / "routing_hook.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
