"""Expert rows between EP ranks on Ascend: the exchanger's pieces as batched p2p ops.

eplb.exchange.Exchanger posts one gloo isend / irecv per rank pair and weight, matched by tag. On
NPUs the rows are device tensors and the group is HCCL, which, like NCCL, matches p2p ops by order,
ignores tags (kept for gloo, where they separate the pieces) and can hang on two ranks sending to each other with separately posted ops; so each
piece goes as one `torch.distributed.batch_isend_irecv` of all its ops (what vllm-ascend's own D2D
loader does), gathered rows are indexed on the weights' device, and sender and receiver list a pair's
ops in the same order (plan order, w13 before w2), which the layout already guarantees. Everything
else (layout, pieces, receive buffers, the agreement around them) is the exchanger's own.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from eplb.exchange import Exchange, Exchanger, Posted, run_start
from eplb.pending import PendingPlan


class BatchedExchanger(Exchanger):
    """Exchanger whose pieces are posted as one batch_isend_irecv each (HCCL / NCCL; gloo runs it too)."""

    def post_piece(
        self, p: PendingPlan, ex: Exchange, piece: int, slots: int, tag: int, weight: int = -1
    ) -> Posted:
        """Post piece `piece` of a layer's exchange (rows [piece*slots, (piece+1)*slots) of every rank
        pair's list, all with slots == 0) of weight `weight` (0: w13, 1: w2, -1: both); rows this rank
        keeps are copied at once. The receive buffers hold the rows once the works complete."""
        import torch.distributed as dist

        me, s = self.slots.ep_rank, ex.staged
        w13, w2 = self.slots.weights(ex.layer)
        pairs = [(w13, s.w13), (w2, s.w2)]
        which = [0, 1] if weight < 0 else [weight]
        ops: list[Any] = []
        keep: list[torch.Tensor] = []
        t_post = time.perf_counter()

        def span(k: int) -> tuple[int, int]:
            return (piece * slots, min(k, (piece + 1) * slots)) if slots else (0, k)

        def rows_of(w: torch.Tensor, rows: list[int]) -> torch.Tensor:
            r0 = run_start(rows)
            if r0 is not None:  # a contiguous run: a view of the live weights (they change only at commit)
                return w[r0 : r0 + len(rows)]
            return w.index_select(0, torch.tensor(rows, dtype=torch.int64, device=w.device))

        for src_rank, at, src_rows in ex.recv:
            lo, hi = span(len(src_rows))
            if lo >= hi:
                continue
            for i in which:
                w, buf = pairs[i]
                if src_rank == me:
                    buf[at + lo : at + hi].copy_(rows_of(w, src_rows[lo:hi]))
                else:
                    ops.append(
                        dist.P2POp(
                            dist.irecv, buf[at + lo : at + hi], self._global(src_rank), self.group, tag + i
                        )
                    )
                    p.remote_bytes += buf[at + lo : at + hi].numel() * buf.element_size()
        for dst_rank, out_rows in ex.send:
            lo, hi = span(len(out_rows))
            if lo >= hi:
                continue
            for i in which:
                keep.append(rows_of(pairs[i][0], out_rows[lo:hi]).contiguous())
                ops.append(dist.P2POp(dist.isend, keep[-1], self._global(dst_rank), self.group, tag + i))
        works = dist.batch_isend_irecv(ops) if ops else []
        return Posted(ex.layer, list(works), keep, t_post)

    def stage_layer_per_slot(self, p: PendingPlan, layer: int, deadline: float) -> Any:
        raise NotImplementedError("transfer.per_slot (a CPU benchmark baseline) is not available on Ascend")
