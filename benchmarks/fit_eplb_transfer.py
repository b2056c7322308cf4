"""Fit the simulator's one free transfer parameter, `TransferConfig.p2p_op_latency_s`.

Source: vllm-ascend's SwiftBalancer PR measured batch_isend_irecv of 16 experts' weights at more than
100 ms on an Ascend A2 server (stop-the-world, inside one node). Every other transfer parameter is a
physical figure (expert bytes of DeepSeek-V3 in 8-bit weights, one HCCS link's 56 GB/s). Taking the
16 ops as serialised on one link (the busiest pair carries them all) and 100 ms as the time:

    16 * expert_bytes / intra_node_bw + 16 * p2p_op_latency_s = 0.100 s

The figure is a lower bound ("more than 100 ms"), so the fitted latency is too. It is the only number
taken from the seed's stop-the-world measurement; the figures the model is checked against (async
cost per layer, decode gain at EP 64, whole-plan stalls) are predictions.

    .venv/bin/python benchmarks/fit_eplb_transfer.py        # prints the value for ray_configs / config.py
"""

from __future__ import annotations

import json

from cluster.sim.config import TransferConfig
from cluster.sim.transfer import expert_bytes

SEED_EXPERTS = 16
SEED_STALL_S = 0.100


def fit_p2p_op_latency(
    t: TransferConfig, experts: int = SEED_EXPERTS, stall_s: float = SEED_STALL_S
) -> float:
    """Per-op latency (seconds) that makes ``experts`` serialised intra-node ops take ``stall_s``."""
    link_s = experts * expert_bytes(t) / t.intra_node_bw_Bps
    if link_s >= stall_s:
        raise ValueError(f"bandwidth alone takes {link_s:.4f} s >= {stall_s} s: nothing left to fit")
    return (stall_s - link_s) / experts


def main() -> int:
    t = TransferConfig()
    latency = fit_p2p_op_latency(t)
    print(
        json.dumps(
            {
                "expert_bytes": expert_bytes(t),
                "link_s_for_16": round(SEED_EXPERTS * expert_bytes(t) / t.intra_node_bw_Bps, 6),
                "p2p_op_latency_s": round(latency, 5),
                "config_value": t.p2p_op_latency_s,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
