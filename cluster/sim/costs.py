"""Step-time model: what one lockstep step costs each rank, and so the group.

Per rank r in a step (all times in seconds, parameters in `CostConfig`):

    attention_r = step_overhead_s + rank_fixed_s
                  + dense_per_token_s            * tokens_r           (projections, shared expert, dense layers)
                  + attn_decode_per_ctx_token_s  * decode_context_r   (KV reads of decoding requests)
                  + attn_prefill_per_token_pair_s * prefill_pairs_r   (causal attention of prefill chunks)

    moe   = (num_moe_layers / sim_layers) * sum over simulated layers l of
              moe_layer_fixed_s + moe_per_expert_token_s * max_rank recv[l, rank]
    a2a   = (num_moe_layers / sim_layers) * sum over simulated layers l of
              a2a_layer_fixed_s + a2a_per_expert_token_s * max(max_rank recv[l, rank], max_rank send_r)

    rank_time_r = attention_r + moe + a2a          step_time = max_r rank_time_r

recv[l, rank] is the number of (token, expert) pairs routed to the experts that rank hosts in layer l
(from every rank's tokens: EP spans the DP group), send_r = tokens_r * top_k. MoE and all-to-all are
synchronised per layer, so every rank pays the busiest EP rank's expert time: that is how expert
imbalance enters the step time. An idle rank still runs a dummy batch (step_overhead_s + rank_fixed_s)
and takes part in every all-to-all, as vLLM's DP engines do. Expert-weight transfers (EPLB) are
costed in `cluster.sim.transfer`.
"""

from __future__ import annotations

import numpy as np

from cluster.sim.config import CostConfig


class CostModel:
    """Evaluates the step-time formula above for arrays of per-rank work."""

    def __init__(self, c: CostConfig, num_moe_layers: int, sim_layers: int, top_k: int) -> None:
        self.c = c
        self.layer_scale = num_moe_layers / sim_layers
        self.top_k = top_k
        self.num_moe_layers = num_moe_layers

    def attention(self, tokens: np.ndarray, decode_ctx: np.ndarray, prefill_pairs: np.ndarray) -> np.ndarray:
        """Per-rank non-expert time (includes the fixed per-step host and weight-read costs)."""
        c = self.c
        return (
            c.step_overhead_s
            + c.rank_fixed_s
            + c.dense_per_token_s * tokens
            + c.attn_decode_per_ctx_token_s * decode_ctx
            + c.attn_prefill_per_token_pair_s * prefill_pairs
        )

    def moe_and_a2a(self, max_recv: np.ndarray, max_send: float) -> tuple[float, float]:
        """(MoE, all-to-all) seconds for the step from each simulated layer's busiest EP rank load."""
        c = self.c
        n = len(max_recv)
        moe = self.layer_scale * (n * c.moe_layer_fixed_s + c.moe_per_expert_token_s * float(max_recv.sum()))
        volume = np.maximum(max_recv, max_send)
        a2a = self.layer_scale * (n * c.a2a_layer_fixed_s + c.a2a_per_expert_token_s * float(volume.sum()))
        return moe, a2a

    def a2a_link(self, max_recv: np.ndarray, max_send: float) -> float:
        """The bandwidth-bound part of the step's all-to-all (seconds): what shares the link with an
        asynchronous expert transfer. max_recv float [sim_layers]."""
        volume = np.maximum(max_recv, max_send)
        return self.layer_scale * self.c.a2a_per_expert_token_s * float(volume.sum())
