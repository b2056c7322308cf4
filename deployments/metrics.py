"""Serving-path metrics, exported through ray.util.metrics (Prometheus / the Ray dashboard): the
ingress's, and the frames a rank's request socket drops."""

from __future__ import annotations

import logging
from typing import Any

from npu_runtime import metric_names as names

logger = logging.getLogger("dpserve.metrics")


def frames_dropped_counter() -> Any:
    """`dpserve_internal_frames_dropped`, in whichever process drops the frames (the ingress:
    channel=output; each rank: channel=request)."""
    from ray.util import metrics

    return metrics.Counter(
        names.INTERNAL_FRAMES_DROPPED,
        "frames dropped on dpserve's internal ZMQ sockets (unauthenticated, malformed, replayed)",
        tag_keys=("channel", "reason"),
    )


class FrameDrops:
    """Counts frames dropped on one internal channel (`channel` label) by reason; the counter is made
    at the first drop, so a process that drops nothing registers nothing. A metric that cannot be
    recorded is logged once and never stops the channel."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._counter: Any = None
        self._failed = False

    def __call__(self, reason: str) -> None:
        if self._failed:
            return
        try:
            if self._counter is None:
                self._counter = frames_dropped_counter()
            self._counter.inc(1, tags={"channel": self.channel, "reason": reason})
        except Exception:
            self._failed = True
            logger.warning("dropped %s frames cannot be exported as a metric", self.channel, exc_info=True)


class IngressMetrics:
    """Ingress-side figures exported through ray.util.metrics (Prometheus / Ray dashboard)."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(names.REQUESTS_TOTAL, "requests by rank and outcome",
                                        tag_keys=("rank", "status"))  # fmt: skip
        self.running = metrics.Gauge(names.RANK_RUNNING, "running requests per DP rank", tag_keys=("rank",))
        self.waiting = metrics.Gauge(names.RANK_WAITING, "waiting requests per DP rank", tag_keys=("rank",))
        bounds = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
        self.ttft_ms = metrics.Histogram(names.TTFT_MS, "time to first token (ms)", boundaries=bounds)
        self.tpot_ms = metrics.Histogram(names.TPOT_MS, "time per output token after the first (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])  # fmt: skip

        self.frames_dropped = frames_dropped_counter()

    def internal_frame_dropped(self, channel: str, reason: str) -> None:
        self.frames_dropped.inc(1, tags={"channel": channel, "reason": reason})

    def rank_gauges(self, rank: int, stats: dict[str, Any]) -> None:
        tags = {"rank": str(rank)}
        self.running.set(stats.get("running", 0), tags=tags)
        self.waiting.set(stats.get("waiting", 0), tags=tags)

    def request_done(self, rank: int, status: str) -> None:
        self.requests.inc(1, tags={"rank": str(rank), "status": status})

    def ttft(self, seconds: float) -> None:
        self.ttft_ms.observe(seconds * 1000)

    def tpot(self, seconds: float) -> None:
        self.tpot_ms.observe(seconds * 1000)
