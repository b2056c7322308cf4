"""The balance coordinator's Ray metrics (``ray.util.metrics``), a no-op outside Ray.

One concern: the instruments the ``BalanceCoordinator`` actor (``scheduler/coordinator.py``) updates —
gate-closed steps, ranks excluded for silence, gate frames dropped, and the per-step gather latency.
"""

from __future__ import annotations


class Metrics:
    """ray.util.metrics instruments; a no-op outside Ray (so the class works in plain tests).

    Per-rank running/waiting gauges (``dpserve_rank_running`` / ``_waiting``) are exported by the
    ingress only (``deployments/metrics.py``; it also covers serving without balance): exporting
    them here as well gave two series per rank.
    """

    def __init__(self) -> None:
        try:
            from ray.util import metrics

            self._closed = metrics.Counter(
                "dpserve_gate_closed_steps", "Lockstep steps with the prefill gate closed"
            )
            self._excluded = metrics.Counter(
                "dpserve_gate_rank_excluded",
                "Ranks excluded from the gate for not reporting",
                tag_keys=("rank",),
            )
            self._dropped = metrics.Counter(
                "dpserve_internal_frames_dropped",  # npu_runtime.metric_names.INTERNAL_FRAMES_DROPPED
                "frames dropped on dpserve's internal ZMQ sockets (unauthenticated, malformed, invalid)",
                tag_keys=("channel", "reason"),
            )
            self._gather = metrics.Histogram(
                "dpserve_gate_gather_latency_ms",
                "Spread between the first and the last rank's report of one lockstep step",
                boundaries=[0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 500],
            )
            self.ok = True
        except Exception:  # pragma: no cover - metrics unavailable
            self.ok = False

    def closed(self) -> None:
        if self.ok:
            self._closed.inc()

    def excluded(self, rank: int) -> None:
        if self.ok:
            self._excluded.inc(tags={"rank": str(rank)})

    def dropped(self, reason: str) -> None:
        if self.ok:
            self._dropped.inc(tags={"channel": "gate", "reason": reason})

    def gather(self, ms: float) -> None:
        if self.ok:
            self._gather.observe(ms)
