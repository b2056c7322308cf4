"""Requests, the benchmark client that sends them, and the API server's router.

The client follows vLLM's `bench serve`: requests become ready on a Poisson process (or all at once for
rate ``inf``), a semaphore of size ``max_concurrency`` holds the rest back, and a freed slot sends the
next request in order. The router reproduces vLLM's DP load balancer, including the staleness of the
counts it sees, because that staleness decides how often a request lands on a full rank and waits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from cluster.sim.config import RouterConfig, WorkloadConfig
from deployments import router as dp_router


@dataclass
class Requests:
    """Per-request arrays (index = request id)."""

    prompt_len: np.ndarray  # int64
    output_len: np.ndarray  # int64
    ready_t: np.ndarray  # float64: when the client would send it, ignoring the concurrency cap

    @property
    def n(self) -> int:
        return len(self.prompt_len)


def make_requests(w: WorkloadConfig, rng: np.random.Generator) -> Requests:
    """Draw the request set (lengths and ready times) for workload ``w``."""
    n = w.num_requests

    def lengths(mean: int, ratio: float) -> np.ndarray:
        if ratio <= 0:
            return np.full(n, mean, dtype=np.int64)
        lo = max(1, int(mean * (1 - ratio)))
        hi = max(lo, int(mean * (1 + ratio)))
        return rng.integers(lo, hi + 1, size=n, dtype=np.int64)

    out_ratio = w.len_range_ratio if w.output_len_range_ratio is None else w.output_len_range_ratio
    prompt, output = lengths(w.input_len, w.len_range_ratio), lengths(w.output_len, out_ratio)
    if math.isinf(w.request_rate):
        ready = np.zeros(n)
    else:
        events = -(-n // w.burst_size)
        ready = np.repeat(
            np.cumsum(rng.exponential(w.burst_size / w.request_rate, size=events)), w.burst_size
        )[:n]
        ready -= ready[0]  # the benchmark clock starts with the first request
    return Requests(prompt_len=prompt, output_len=output, ready_t=ready)


class Client:
    """The benchmark client: a FIFO of requests behind a concurrency semaphore.

    Arrivals at the engine are ``send time + client_delay_s``; ``pop_arrivals`` hands them out in
    time order.
    """

    def __init__(self, reqs: Requests, w: WorkloadConfig, rng: np.random.Generator) -> None:
        self.reqs = reqs
        self.delay = w.client_delay_s
        self.jitter = w.client_delay_jitter_s
        self.rng = rng
        self.send_t = np.full(reqs.n, np.nan)
        self._next = 0
        self._heap: list[tuple[float, int]] = []  # (arrival at engine, request id)
        cap = reqs.n if w.max_concurrency is None else min(w.max_concurrency, reqs.n)
        for _ in range(cap):
            self._send(self.reqs.ready_t[self._next])

    def _send(self, not_before: float) -> None:
        rid = self._next
        self._next += 1
        t = max(not_before, float(self.reqs.ready_t[rid]))
        self.send_t[rid] = t
        delay = self.delay + (self.rng.exponential(self.jitter) if self.jitter > 0 else 0.0)
        heapq.heappush(self._heap, (t + delay, rid))

    def on_finish(self, t: float) -> None:
        """A request finished at ``t``: its semaphore slot sends the next request, if any."""
        if self._next < self.reqs.n:
            self._send(t)

    def next_arrival(self) -> float:
        """Time of the earliest pending arrival (inf if none)."""
        return self._heap[0][0] if self._heap else math.inf

    def pop_arrivals(self, before: float) -> list[tuple[float, int]]:
        """Arrivals strictly before ``before``, in time order."""
        out = []
        while self._heap and self._heap[0][0] < before:
            out.append(heapq.heappop(self._heap))
        return out


class Router:
    """Picks a DP rank for each arriving request.

    ``least_loaded_stale`` mirrors vLLM's ``DPLBAsyncMPClient``: the coordinator publishes
    (waiting, running) every ``stats_interval_s``; between publishes the router adds each assignment
    to its local copy's waiting count; the lowest score 4 * waiting + running wins, ties to the lowest
    rank. A published snapshot shows the engines' state at the last step boundary before it.
    """

    def __init__(self, cfg: RouterConfig, num_ranks: int, rng: np.random.Generator) -> None:
        self.kind = cfg.kind
        self.rng = rng
        self.interval = cfg.stats_interval_s
        self.num_ranks = num_ranks
        self._view = np.zeros((num_ranks, 2), dtype=np.int64)  # (waiting, running) as the router sees it
        self._next_publish = 0.0
        self._rr = 0

    def route(self, t: float, waiting: list[int], running: list[int]) -> int:
        """Rank for a request arriving at ``t``; ``waiting``/``running`` are the engines' true counts."""
        if self.kind == "round_robin":
            r = self._rr
            self._rr = (self._rr + 1) % self.num_ranks
            return r
        if self.kind == "random":
            return int(self.rng.integers(self.num_ranks))
        if self.kind == "dpserve":
            return self._route_dpserve(t, waiting, running)
        self._refresh_view(t, waiting, running, always=self.kind == "least_loaded")
        score = 4 * self._view[:, 0] + self._view[:, 1]
        r = int(np.argmin(score))  # argmin returns the first minimum: ties go to the lowest rank
        self._view[r, 0] += 1
        return r

    def _refresh_view(self, t: float, waiting: list[int], running: list[int], always: bool = False) -> None:
        """Take the engines' counts as published at ``t`` (every ``stats_interval_s``, or ``always``)."""
        if always or t >= self._next_publish:
            self._view[:, 0] = waiting
            self._view[:, 1] = running
            if self.interval > 0:
                self._next_publish = (math.floor(t / self.interval) + 1) * self.interval

    def _route_dpserve(self, t: float, waiting: list[int], running: list[int]) -> int:
        """dpserve's ingress, through the product's own rule (`deployments.router.pick_rank`): its exact
        count of requests dispatched and not finished per rank (here all of a rank's waiting and
        running requests), and the engines' running/waiting counts as of their last stats
        (refreshed every ``stats_interval_s``)."""
        self._refresh_view(t, waiting, running)
        loads = {
            r: dp_router.RankLoad(dispatched=waiting[r] + running[r], running=int(self._view[r, 1]),
                                  waiting=int(self._view[r, 0]))
            for r in range(self.num_ranks)
        }  # fmt: skip
        return dp_router.pick_rank(loads)
