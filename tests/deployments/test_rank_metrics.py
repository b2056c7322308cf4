"""Which vLLM stat loggers a rank's engine runs (engine_metrics on/off)."""

from __future__ import annotations

import pytest

from deployments.config import EngineSettings
from deployments.rank_stats import RankStats, stats_logger_factory, vllm_metrics_logger


@pytest.fixture(scope="module")
def vllm_config(tiny_model_dir: str):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=tiny_model_dir, max_model_len=256, enforce_eager=True).create_engine_config()


def _manager(vllm_config, engine_metrics: bool):
    from vllm.v1.metrics.loggers import StatLoggerManager

    stats = RankStats(rank=0)
    factories = [stats_logger_factory(stats), vllm_metrics_logger(engine_metrics)]
    return StatLoggerManager(vllm_config, engine_idxs=[0], custom_stat_loggers=factories), stats


def test_engine_metrics_default_off() -> None:
    assert EngineSettings().engine_metrics is False
    assert EngineSettings.model_validate({"engine_metrics": True}).engine_metrics is True


def test_metrics_off_adds_no_prometheus_logger_and_rank_stats_still_update(vllm_config) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    manager, stats = _manager(vllm_config, engine_metrics=False)
    prometheus = [lg for lg in manager.stat_loggers if isinstance(lg, PrometheusStatLogger)]
    assert len(prometheus) == 1 and type(prometheus[0]).__name__ == "_NoEngineMetrics"
    manager.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2), None, engine_idx=0)
    manager.log()
    assert (stats.running, stats.waiting, stats.step) == (3, 2, 1)


def test_metrics_on_uses_vllms_ray_logger(vllm_config) -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    manager, _ = _manager(vllm_config, engine_metrics=True)
    prometheus = [lg for lg in manager.stat_loggers if isinstance(lg, PrometheusStatLogger)]
    assert [type(lg) for lg in prometheus] == [RayPrometheusStatLogger]
