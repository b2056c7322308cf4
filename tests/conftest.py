"""Shared fixtures: the tiny model (built once per machine) and a local Ray instance on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# vLLM's CPU defaults must be in the environment before any engine process starts.
from npu_runtime.platform import apply_vllm_env

apply_vllm_env()
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

# Shared test helpers are imported as `tests.helpers`: the repository root must be importable however
# pytest was started (`python -m pytest` adds it; the `pytest` script with --import-mode=importlib does not).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# vllm-ascend's sources for the Ascend adapter's tests (fixtures vllm_ascend_root, vllm_ascend_on_path).
from tests.ascend_src import vllm_ascend_on_path, vllm_ascend_root  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_model_dir():
    from npu_runtime.tiny_model import build_tiny_moe

    return str(build_tiny_moe())


@pytest.fixture(scope="session")
def metrics_port():
    """Port where the session's Ray exports Prometheus metrics."""
    from deployments.rank import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_local(metrics_port):
    """A Ray instance for the test session (more logical CPUs than cores: actors mostly wait)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 _metrics_export_port=metrics_port)  # fmt: skip
    yield ray
    ray.shutdown()


# ---- test tiers ------------------------------------------------------------------------------------
# `make test-fast` runs `-m "not slow"` with DPSERVE_TEST_TIER=fast: no engine, no cluster. A test that
# uses one of these fixtures starts Ray (or a Ray cluster) and is slow whether or not it says so.
SLOW_FIXTURES = frozenset({"ray_local", "netns_ray_cluster", "netns_npu_cluster"})
FAST_TIER = os.environ.get("DPSERVE_TEST_TIER") == "fast"


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_cluster(request, monkeypatch):
    """In the fast tier, a test not marked slow that starts Ray fails, naming the marker it lacks."""
    if FAST_TIER and request.node.get_closest_marker("slow") is None:
        import ray

        def refuse(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.slow")

        monkeypatch.setattr(ray, "init", refuse)
    yield
