"""What moving expert weights costs: bytes over links, per-op latency, and overlap with compute.

Units: bytes, bytes/s, seconds. Parameters are `TransferConfig`'s.

One layer's re-placement is the list of ops `eplb.plan.build_transfer_plan` makes (the product's own
transfer planning: local copy when the destination rank already holds the expert, else the holder that
has sent least). For the busiest rank r of that layer:

    link_s(r)  = max(intra_bytes(r) / intra_node_bw, inter_bytes(r) / inter_node_bw)   (send or recv,
                 whichever is larger; HCCS/NVLink and the scale-out NIC are separate links)
    ops_s(r)   = remote_ops(r) * p2p_op_latency_s
    copy_s(r)  = 2 * received_bytes(r) / hbm_bw                                         (buffer -> weights)
    layer_s    = max_r (link_s + ops_s),   copy_s = max_r copy_s

Stop-the-world (``sync``): every layer moves while the engines wait; the stall is
sum over layers of (layer_s + copy_s), carried by one step.

Asynchronous (``async``, SwiftBalancer / dpserve): ``layers_per_step`` layers per step (1 by default);
their ops run one after another on a side stream launched before the forward and waited for after
it, so the step only sees (sums over the step's layers)

    async_sync_s + copy_s + contention + max(0, layer_s - step_s)

where contention = link_s * a2a_s / step_s: the transfer shares the scale-out link with the
all-to-all, and while both are active the all-to-all's bytes take longer by the transfer's share of
the link (fair sharing). Latency-bound op overhead does not contend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cluster.sim.config import TransferConfig


def expert_bytes(t: TransferConfig) -> int:
    """Bytes of one routed expert's weights: gate, up and down (3 x hidden x intermediate) plus the
    fp32 block scales of 8-bit weights (one per ``scale_block`` x ``scale_block`` block)."""
    params = 3 * t.hidden_size * t.moe_intermediate_size
    weights = params * t.bytes_per_param
    scales = 0
    if t.bytes_per_param < 2 and t.scale_block > 0:
        blocks = math.ceil(t.hidden_size / t.scale_block) * math.ceil(t.moe_intermediate_size / t.scale_block)
        scales = 3 * blocks * 4
    return int(round(weights + scales))


@dataclass(frozen=True)
class LayerTransfer:
    """Cost of moving one layer's changed slots (seconds) and its size."""

    layer_s: float  # busiest rank's link time + per-op latency (the transfer's duration)
    link_s: float  # busiest rank's bandwidth-bound part (what competes with the all-to-all)
    copy_s: float  # busiest receiver's buffer-to-weights copy in HBM
    moved_slots: int  # slots whose expert changes
    max_rank_slots: int  # slots changed on the busiest receiving rank


def rank_traffic(
    src_rank: np.ndarray, dst_rank: np.ndarray, num_ranks: int, ranks_per_node: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-rank op counts for one layer's ops (int arrays [ops] of source and destination ranks).

    Returns int64 [num_ranks] each: (intra-node ops, inter-node ops, remote ops, received slots), where
    intra/inter count every op a rank sends or receives (a rank's link carries both directions' worth
    of bytes only up to the larger of them: the max over send and recv is taken per class) and local
    copies (src == dst) count only as received slots.
    """
    src = np.asarray(src_rank, dtype=np.int64)
    dst = np.asarray(dst_rank, dtype=np.int64)
    remote = src != dst
    inter = remote & (src // ranks_per_node != dst // ranks_per_node)
    intra = remote & ~inter

    def per_rank(mask: np.ndarray) -> np.ndarray:
        send = np.bincount(src[mask], minlength=num_ranks)
        recv = np.bincount(dst[mask], minlength=num_ranks)
        return np.maximum(send, recv)

    return per_rank(intra), per_rank(inter), per_rank(remote), np.bincount(dst, minlength=num_ranks)


def layer_transfer(
    src_rank: np.ndarray, dst_rank: np.ndarray, num_ranks: int, t: TransferConfig
) -> LayerTransfer:
    """Cost of one layer's ops, given as int arrays [ops] of source and destination ranks."""
    if len(dst_rank) == 0:
        return LayerTransfer(0.0, 0.0, 0.0, 0, 0)
    size = expert_bytes(t)
    intra, inter, remote, recv = rank_traffic(src_rank, dst_rank, num_ranks, t.ranks_per_node)
    link = np.maximum(intra * size / t.intra_node_bw_Bps, inter * size / t.inter_node_bw_Bps)
    total = link + remote * t.p2p_op_latency_s
    busiest = int(np.argmax(total))
    return LayerTransfer(
        layer_s=float(total[busiest]),
        link_s=float(link[busiest]),
        copy_s=float(2 * recv.max() * size / t.hbm_bw_Bps),
        moved_slots=len(dst_rank),
        max_rank_slots=int(recv.max()),
    )


def sync_stall_s(layers: list[LayerTransfer]) -> float:
    """Stop-the-world: every layer's transfer and copy, one after another, on one step (seconds)."""
    return float(sum(x.layer_s + x.copy_s for x in layers))


def async_step_cost_s(x: LayerTransfer, step_s: float, a2a_s: float, t: TransferConfig) -> float:
    """Seconds one layer's asynchronous move adds to the step carrying it.

    step_s: the step's time without the transfer; a2a_s: its all-to-all time (both seconds).
    """
    return async_layers_cost_s([x], step_s, a2a_s, t)


def async_layers_cost_s(xs: list[LayerTransfer], step_s: float, a2a_s: float, t: TransferConfig) -> float:
    """Seconds the asynchronous moves of several layers add to the one step carrying them (the
    product's ``layers_per_step``): their ops run one after another on the side stream, so their
    durations, link times and copies add up, and each layer pays its own synchronisation.
    """
    xs = [x for x in xs if x.moved_slots]
    if not xs:
        return 0.0
    share = min(1.0, a2a_s / step_s) if step_s > 0 else 1.0
    exposed = max(0.0, sum(x.layer_s for x in xs) - step_s)
    return sum(t.async_sync_s + x.copy_s + x.link_s * share for x in xs) + exposed
