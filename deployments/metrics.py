"""Ingress-side metrics, exported through ray.util.metrics (Prometheus / the Ray dashboard)."""

from __future__ import annotations

from typing import Any

from npu_runtime import metric_names as names


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

        self.frames_dropped = metrics.Counter(
            names.INTERNAL_FRAMES_DROPPED,
            "frames dropped on dpserve's internal ZMQ sockets (unauthenticated, malformed, replayed)",
            tag_keys=("channel", "reason"),
        )

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
