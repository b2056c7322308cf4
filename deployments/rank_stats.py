"""A rank's load as the ingress sees it (`RankStats`) and the vLLM stat loggers its engine runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class RankStats:
    rank: int
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    step: int = 0
    updated: float = 0.0  # time.monotonic() of the last engine stats update
    in_flight: int = 0  # requests this rank's frontend holds (admitted, not yet finished)
    ready: bool = False
    errored: bool = False  # the engine died (e.g. a peer rank's collectives broke)
    vllm_patches: str = ""  # the vLLM version and refused features (npu_runtime.vllm_patches.summary)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stats_logger_factory(stats: RankStats):
    """A vLLM stat-logger factory that mirrors the engine's scheduler stats into `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _RankStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            stats.running = scheduler_stats.num_running_reqs
            stats.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            stats.step += 1  # one record() per engine step that produced outputs
            stats.updated = time.monotonic()

        def log_engine_initialized(self):
            pass

    return _RankStatsLogger


def vllm_metrics_logger(enabled: bool):
    """The aggregate logger that fills vLLM's own engine metrics (TTFT/TPOT histograms, KV-cache
    usage, ...). Enabled: vLLM's Ray logger, so they reach the Ray dashboard / Prometheus like
    dpserve's own metrics. Disabled: a logger that records nothing. Either way it takes the place of
    the prometheus_client logger vLLM would add by default, which nobody scrapes inside a Ray actor
    and which costs the rank CPU on every engine step."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    if enabled:
        return RayPrometheusStatLogger

    class _NoEngineMetrics(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
            self.engine_indexes = engine_indexes or [0]  # no metric objects: nothing registered

        def record(self, *args, **kwargs) -> None:
            pass

        def record_sleep_state(self, *args, **kwargs) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _NoEngineMetrics
