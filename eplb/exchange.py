"""The data paths that move expert rows between EP ranks over the transfer group (gloo).

Every path reads its sources from the OLD placement, still in force, into receive buffers (`Staged`);
the commit copies them into the weights later, at an agreed step.

* inline (default): no staging thread. A layer's exchange is cut into pieces of at most
  `slots_per_step` slots per rank pair (the same pieces on every rank, from the plan); at every step
  boundary, on the engine's main thread inside the step sync, the pieces posted at the previous step
  are completed (gloo wait on ops every peer posted then; gloo's I/O threads moved the bytes during
  that forward) and the next pieces' non-blocking gloo isend/irecv are posted (`inline_step`): one
  per step, or (`fit_step`) as many as the group's last step would hide, from a step time every rank
  gets from the step sync.
* staging thread (`inline: False`): a background thread (nice 19, one OpenMP thread, one layer
  started per engine step) moves a whole layer per message (`transfer`); `per_slot` moves one
  message per slot instead (a baseline for benchmarks).
* blocking (stop-the-world): `transfer` inside the agreed step, every rank at once.

The transfer group is a dedicated gloo group created at setup, never interleaved with vLLM's
collectives.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eplb.pacing import layers_this_step
from eplb.pending import PendingPlan, Staged
from eplb.plan import TransferPlan
from eplb.slots import ModelSlots, layer_tables
from eplb.threads import tune_staging_thread

logger = logging.getLogger("dpserve.eplb.applier")

PACE_WAIT_S = 0.25  # a paced layer starts at the latest this long after the previous one


@dataclass
class Exchange:
    """One layer's exchange on this rank (see Exchanger.layout)."""

    layer: int
    staged: Staged  # its receive buffers fill piece by piece
    recv: list[tuple[int, int, list[int]]]  # (source rank, first buffer row, rows on the source rank)
    send: list[tuple[int, list[int]]]  # (destination rank, rows of this rank to send)


@dataclass
class Posted:
    """One piece of a layer's exchange, posted and not yet waited on."""

    layer: int
    works: list[Any]
    keep: list[torch.Tensor]  # send buffers: alive until their works complete
    t_post: float


def _busiest_pair(plan: TransferPlan, num_ranks: int, layer: int) -> int:
    """The most slots any rank pair (a rank with itself included) moves in `layer`."""
    count = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    for op in plan.ops_by_layer[layer]:
        count[op.src_rank, op.dst_rank] += 1
    return int(count.max()) if count.size else 0


def pieces(plan: TransferPlan, num_ranks: int, slots: int, split: bool = False) -> list[tuple[int, int, int]]:
    """(layer, piece, weight) in posting order. A layer has ceil(m / slots) pieces, m the most slots any
    rank pair (a rank with itself included) moves in it, and at least one; with `split`, each piece is
    posted as two, w13 (weight 0) then w2 (1), else both weights at once (-1). From the plan alone, so
    that every rank posts the same piece at the same step."""
    out: list[tuple[int, int, int]] = []
    for layer in plan.layers():
        m = _busiest_pair(plan, num_ranks, layer)
        n = max(1, -(-m // slots)) if slots > 0 else 1
        out += [(layer, j, w) for j in range(n) for w in ((0, 1) if split else (-1,))]
    return out


def piece_bytes(
    plan: TransferPlan, num_ranks: int, slots: int, split: bool, slot_bytes: tuple[int, int]
) -> list[int]:
    """Bytes the busiest rank pair moves in each of `pieces(plan, num_ranks, slots, split)`, in the same
    order; slot_bytes: one slot's (w13, w2) bytes. From the plan alone, the same on every rank."""
    out: list[int] = []
    for layer in plan.layers():
        m = _busiest_pair(plan, num_ranks, layer)
        n = max(1, -(-m // slots)) if slots > 0 else 1
        for j in range(n):
            k = min(slots, m - j * slots) if slots > 0 else m
            out += [k * slot_bytes[w] for w in (0, 1)] if split else [k * sum(slot_bytes)]
    return out


def run_start(rows: list[int]) -> int | None:
    """rows[0] when rows are consecutive ascending (r, r+1, ...), else None."""
    if (
        rows
        and rows[-1] - rows[0] == len(rows) - 1
        and all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))
    ):
        return rows[0]
    return None


class Exchanger:
    """This rank's side of every plan's exchange: `slots` (the weights), the transfer `group` (None
    with one EP rank) and its global ranks in EP order. `group_error` is set once a gloo error left the
    group unusable; `fail_next_transfer` injects one failure (tests)."""

    def __init__(self, slots: ModelSlots, group: Any = None, group_ranks: list[int] | None = None) -> None:
        self.slots = slots
        self.group = group
        self.group_ranks = list(group_ranks or [])
        self.group_error: str | None = None
        self.fail_next_transfer = False
        self.transfer_tids: list[int] = []  # native ids of the last staging threads

    def _global(self, ep_rank: int) -> int:
        return self.group_ranks[ep_rank]

    def transfer(self, p: PendingPlan) -> None:
        """Stage every layer of p from the OLD placement (p.staged); sets p.ready or p.failed.

        Runs in the staging thread (async) or inside the agreed step (stop-the-world). Per layer and
        rank pair one message per weight (rows gathered with one index_select), so the thread takes the
        GIL a few times per layer instead of a few times per expert: every torch call releases and
        re-takes the GIL, and each re-take waits for the forward pass's thread to let go of it. Async
        staging starts on every rank at one agreed step (on_sums), so every op has its peer; once
        started, the exchange always runs to its end (a dropped plan's results are discarded).
        """
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        background = threading.current_thread() is not threading.main_thread()
        opts = p.opts
        if background:
            self.transfer_tids = [*self.transfer_tids[-7:], threading.get_native_id()]
            tune_staging_thread(int(opts["nice"]), int(opts["omp_threads"]))
        injected = self.fail_next_transfer  # fault injection for tests (eplb_fail_next_transfer)
        self.fail_next_transfer = False
        try:
            deadline = t0 + float(opts["timeout_s"])
            stage_layer = self.stage_layer_per_slot if opts["per_slot"] else self.stage_layer
            for layer in p.plan.layers():
                if background and opts["paced"]:
                    # At most one layer per engine step, started when a step ends (the first one when
                    # the agreeing step ends); soft (an idle group does not step): after PACE_WAIT_S
                    # it goes on regardless.
                    p.step_done.clear()
                    p.step_done.wait(PACE_WAIT_S)
                # Dropped meanwhile (a peer failed)? The exchange still runs to its end: the peers
                # posted their side of it, and an op left without its peer would hang until timeout.
                t_layer = time.perf_counter()
                p.staged[layer] = stage_layer(p, layer, deadline)
                p.layer_ms.append((layer, t_layer, time.perf_counter()))
            if injected:
                raise RuntimeError("injected transfer failure")
            p.t_ready = time.perf_counter()
            p.ready = True
        except Exception as exc:  # reported through the step sync: every rank drops the plan
            if p.aborted:  # already dropped everywhere (a peer failed, or abort): the late echo
                logger.info("EPLB plan %d: dropped plan's transfer ended: %s", p.plan_id, exc)
                return
            logger.exception("EPLB plan %d: transfer failed", p.plan_id)
            p.failed = f"{type(exc).__name__}: {exc}"
            if not injected and self.group is not None:  # a gloo error leaves the pair closed
                self.group_error = p.failed
        finally:
            p.stage_ms += (time.perf_counter() - t0) * 1e3
            p.stage_cpu_ms += (time.thread_time() - cpu0) * 1e3

    def inline_step(self, p: PendingPlan, step_s: float | None = None) -> None:
        """Inline staging, one call per engine step on the main thread (inside the step's DP sync):
        complete the pieces posted at the previous step, then post the next ones: one, or with the
        fit_step option as many as `step_s` (the group's last step, the same on every rank) hides
        (eplb.pacing.layers_this_step over `p.todo_s`).

        gloo's `is_completed` stays false until `wait` (no non-blocking test exists), so the wait here
        is a real wait, but on ops every peer posted at the previous step boundary (they all passed
        this step's all-reduce since) whose bytes gloo's I/O threads moved during that step's forward:
        it returns in microseconds when the step hid them (`wait_ms` in the plan history). A hung peer
        is bounded by the transfer group's gloo timeout, as for the staging thread.
        """
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        try:
            if p.inflight:
                done, p.inflight = p.inflight, []
                for posted in done:
                    self._wait(posted.works, p, 0.0)
                p.wait_ms.append((time.perf_counter() - t0) * 1e3)
                last = {posted.layer: posted for posted in done}  # a layer's last piece posted
                for layer, posted in last.items():
                    if not p.todo or p.todo[0][0] != layer:  # no piece of the layer left to post
                        p.staged[layer] = p.exchanges.pop(layer).staged
                        p.layer_ms.append((layer, posted.t_post, time.perf_counter()))
            if p.todo:
                n = 1
                if p.opts["fit_step"] and step_s is not None and p.todo_s:
                    n = layers_this_step(p.todo_s, step_s, 1)
                for _ in range(n):
                    layer, piece, weight = p.todo.pop(0)
                    if p.todo_s:
                        p.todo_s.pop(0)
                    if layer not in p.exchanges:
                        p.exchanges[layer] = self.layout(p, layer)
                    tag = p.plan_id * 32768 + 2 * p.seq  # unique per piece (pieces < 8192, checked at accept)
                    p.seq += 1
                    p.inflight.append(
                        self.post_piece(
                            p, p.exchanges[layer], piece, int(p.opts["slots_per_step"]), tag, weight
                        )
                    )
                return
            if p.injected:
                raise RuntimeError("injected transfer failure")
            p.t_ready = time.perf_counter()
            p.ready = True
        except Exception as exc:  # reported through the step sync: every rank drops the plan
            logger.exception("EPLB plan %d: inline transfer failed", p.plan_id)
            p.failed = f"{type(exc).__name__}: {exc}"
            p.inflight, p.todo, p.todo_s = [], [], []
            if not p.injected and self.group is not None:  # a gloo error leaves the pair closed
                self.group_error = p.failed
        finally:
            p.stage_ms = ((p.t_ready or time.perf_counter()) - p.t_started) * 1e3  # wall, start to ready
            cpu = (time.thread_time() - cpu0) * 1e3
            p.stage_cpu_ms += cpu  # main-thread CPU of these steps
            p.inline_steps.append(((time.perf_counter() - t0) * 1e3, cpu))

    def _tag(self, p: PendingPlan, layer: int) -> int:
        # Unique for the worker's life (plan ids only grow, < 40000; layers < 16384): a dropped plan's
        # messages may stay posted on the group and must never match a later plan's.
        return p.plan_id * 32768 + layer * 2

    def _wait(self, works: list[Any], p: PendingPlan, deadline: float) -> None:
        """Block on the works (GIL released; gloo's `is_completed` stays false until `wait`). Every
        op has its peer (staging starts on every rank at one agreed step), the group's timeout
        bounds a hung peer."""
        for w in works:
            w.wait()

    def stage_layer(self, p: PendingPlan, layer: int, deadline: float) -> Staged:
        ex = self.layout(p, layer)
        posted = self.post_piece(p, ex, 0, 0, self._tag(p, layer))
        self._wait(posted.works, p, deadline)
        return ex.staged

    def layout(self, p: PendingPlan, layer: int) -> Exchange:
        """`layer`'s exchange on this rank: where each incoming row lands in the receive buffers, which
        rows go to each peer (plan order on both sides, so sender and receiver agree), the tables."""
        me, spr = self.slots.ep_rank, self.slots.spr
        w13, w2 = self.slots.weights(layer)
        incoming: dict[int, list[Any]] = {}  # source rank -> ops writing a slot of this rank, plan order
        outgoing: dict[int, list[int]] = {}  # destination rank -> rows this rank sends, plan order
        for op in p.plan.ops_by_layer[layer]:
            if op.dst_rank == me:
                incoming.setdefault(op.src_rank, []).append(op)
            elif op.src_rank == me:
                outgoing.setdefault(op.dst_rank, []).append(op.src_slot - me * spr)
        n = sum(len(v) for v in incoming.values())
        buf13 = w13.new_empty((n, *w13.shape[1:]))
        buf2 = w2.new_empty((n, *w2.shape[1:]))
        rows: list[int] = []
        recv: list[tuple[int, int, list[int]]] = []
        for src_rank in sorted(incoming):
            ops = incoming[src_rank]
            recv.append((src_rank, len(rows), [op.src_slot - src_rank * spr for op in ops]))
            rows += [op.dst_slot - me * spr for op in ops]
        return Exchange(layer, self.staged(p, layer, rows, buf13, buf2), recv, sorted(outgoing.items()))

    def post_piece(
        self, p: PendingPlan, ex: Exchange, piece: int, slots: int, tag: int, weight: int = -1
    ) -> Posted:
        """Post piece `piece` of a layer's exchange: rows [piece*slots, (piece+1)*slots) of every rank
        pair's list (all of them when slots == 0), of weight `weight` (0: w13, 1: w2, -1: both), as
        non-blocking gloo irecv/isend (a contiguous run of send rows is sent as a view of the weights,
        others gathered by one index_select per weight and peer; rows this rank keeps are copied at
        once). The receive buffers hold the rows once the works complete."""
        import torch.distributed as dist

        me, s = self.slots.ep_rank, ex.staged
        w13, w2 = self.slots.weights(ex.layer)
        pairs = [(w13, s.w13), (w2, s.w2)]  # (weights, receive buffer)
        which = [0, 1] if weight < 0 else [weight]
        works: list[Any] = []
        keep: list[torch.Tensor] = []  # send buffers stay alive until their works complete
        t_post = time.perf_counter()

        def span(k: int) -> tuple[int, int]:
            return (piece * slots, min(k, (piece + 1) * slots)) if slots else (0, k)

        for src_rank, at, src_rows in ex.recv:
            lo, hi = span(len(src_rows))
            if lo >= hi:
                continue
            if src_rank == me:
                r0 = run_start(src_rows[lo:hi])
                idx = None if r0 is not None else torch.tensor(src_rows[lo:hi], dtype=torch.int64)
                for i in which:
                    w, buf = pairs[i]
                    if r0 is not None:  # a contiguous run: a plain copy, no index tensor
                        buf[at + lo : at + hi].copy_(w[r0 : r0 + hi - lo])
                    else:
                        torch.index_select(w, 0, idx, out=buf[at + lo : at + hi])
            else:
                peer = self._global(src_rank)
                for i in which:
                    buf = pairs[i][1][at + lo : at + hi]
                    works.append(dist.irecv(buf, src=peer, group=self.group, tag=tag + i))
                    p.remote_bytes += buf.numel() * buf.element_size()
        for dst_rank, out_rows in ex.send:
            lo, hi = span(len(out_rows))
            if lo >= hi:
                continue
            r0 = run_start(out_rows[lo:hi])
            idx = None if r0 is not None else torch.tensor(out_rows[lo:hi], dtype=torch.int64)
            peer = self._global(dst_rank)
            for i in which:
                w = pairs[i][0]
                # A contiguous run (always, one slot per piece) is sent as a view of the live weights,
                # no copy: they change only at commit, after every piece of every layer completed.
                keep.append(w[r0 : r0 + hi - lo] if r0 is not None else w.index_select(0, idx))
                works.append(dist.isend(keep[-1], dst=peer, group=self.group, tag=tag + i))
        return Posted(ex.layer, works, keep, t_post)

    def stage_layer_per_slot(self, p: PendingPlan, layer: int, deadline: float) -> Staged:
        """One message and a few torch calls per moved slot: the baseline that
        benchmarks/eplb_online.py compares the bulk path with (plan option transfer.per_slot)."""
        import torch.distributed as dist

        me, spr = self.slots.ep_rank, self.slots.spr
        w13, w2 = self.slots.weights(layer)
        n13 = w13[0].numel()
        works, rows, mine, keep = [], [], [], []
        for op in p.plan.ops_by_layer[layer]:
            p.slot_seq += 1
            k = self._tag(p, 0) + 16384 + p.slot_seq  # within the plan's tag range while < 16k ops
            if op.dst_rank == me:
                if op.src_rank == me:
                    src = op.src_slot - me * spr
                    buf = torch.cat([w13[src].reshape(-1), w2[src].reshape(-1)])
                else:
                    buf = torch.empty(n13 + w2[0].numel(), dtype=w13.dtype)
                    works.append(dist.irecv(buf, src=self._global(op.src_rank), group=self.group, tag=k))
                    p.remote_bytes += buf.numel() * buf.element_size()
                rows.append(op.dst_slot - me * spr)
                mine.append(buf)
            elif op.src_rank == me:
                src = op.src_slot - me * spr
                keep.append(torch.cat([w13[src].reshape(-1), w2[src].reshape(-1)]))
                works.append(dist.isend(keep[-1], dst=self._global(op.dst_rank), group=self.group, tag=k))
        self._wait(works, p, deadline)
        buf13 = torch.stack([b[:n13].view(w13.shape[1:]) for b in mine]) if mine else w13[:0].clone()
        buf2 = torch.stack([b[n13:].view(w2.shape[1:]) for b in mine]) if mine else w2[:0].clone()
        return self.staged(p, layer, rows, buf13, buf2)

    def staged(
        self, p: PendingPlan, layer: int, rows: list[int], buf13: torch.Tensor, buf2: torch.Tensor
    ) -> Staged:
        """Everything the commit of `layer` needs, prepared off the step path."""
        new_row = p.plan.new_phy2log[layer].copy()
        table, rc = layer_tables(new_row, self.slots.num_logical, self.slots.cap)
        return Staged(torch.tensor(rows, dtype=torch.int64), buf13, buf2, table, rc, new_row)
