"""The group's platform (deployments/rank_group.py, group_supervisor.py) and each rank's check of its
node (deployments/rank_env.py), without Ray: Ray's calls are replaced by fakes. The same, on a real
cluster of test hosts: tests/cluster/test_platform_placement.py."""

from __future__ import annotations

import asyncio
import types

import pytest

from deployments import rank_group
from deployments.config import DPServeConfig
from npu_runtime import platform as plat


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The fake cluster's resources (ray.cluster_resources), empty until a test fills them."""
    import ray

    resources: dict[str, float] = {}
    monkeypatch.delenv(plat.PLATFORM_ENV, raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    return resources


@pytest.mark.parametrize(
    ("engine", "resources", "expected"),
    [
        ({}, {"CPU": 8.0, "NPU": 16.0}, "npu"),  # whatever the deciding process (here: CPU) has
        ({}, {"CPU": 8.0, "GPU": 2.0}, "cuda"),
        ({}, {"CPU": 8.0}, "cpu"),
        ({"platform": "cpu"}, {"CPU": 8.0, "NPU": 16.0}, "cpu"),
    ],
)
def test_group_platform(cluster, engine, resources, expected) -> None:
    cluster.update(resources)
    settings = DPServeConfig.from_args({"engine": engine}).rank_settings
    assert rank_group.group_platform(settings)[0].name == expected


def test_an_accelerator_platform_is_kept_for_later_groups(cluster, monkeypatch) -> None:
    """The supervisor's start keeps npu once seen (a re-formation with the NPU hosts down waits for
    them rather than going to CPU bundles); cpu is asked again at every start."""
    from deployments.group_supervisor import _start_rank_group

    started: list[str | None] = []

    async def fake_start(settings, *args, **kwargs):
        started.append(settings.platform)
        return [], None, []

    monkeypatch.setattr(rank_group, "start_rank_group", fake_start)
    config = DPServeConfig.from_args({})
    cluster.update({"CPU": 4.0})  # the accelerator hosts have not joined yet
    asyncio.run(_start_rank_group(config, 1))
    assert config.engine.platform is None and started == [None]
    cluster.update({"NPU": 2.0})  # they joined
    asyncio.run(_start_rank_group(config, 2))
    cluster.pop("NPU")  # they are down while the group re-forms
    asyncio.run(_start_rank_group(config, 3))
    assert config.engine.platform == "npu" and started == [None, "npu", "npu"]


@pytest.fixture
def rank_on_node(monkeypatch: pytest.MonkeyPatch):
    """Constructs a DPRank as if in a Ray actor on node 10.77.0.2 with Ray resources `resources`
    and environment `env` (the process's os.environ for the test); `make.node_calls` counts the
    rank's lookups of the cluster's nodes."""
    import ray

    from deployments.rank import DPRank

    def nodes(resources: dict[str, float]) -> list[dict]:
        make.node_calls += 1
        return [{"NodeID": "n1", "Resources": {"CPU": 4.0}}, {"NodeID": "n2", "Resources": resources}]

    def make(platform: str, resources: dict[str, float], env: dict[str, str]) -> DPRank:
        monkeypatch.setattr("os.environ", env)
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        context = types.SimpleNamespace(get_node_id=lambda: "n2", get_accelerator_ids=lambda: {"NPU": ["0"]})
        monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
        monkeypatch.setattr(ray, "nodes", lambda: nodes(resources))
        monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.77.0.2")
        monkeypatch.setattr(plat, "interface_for_ip", lambda ip: None)
        return DPRank({"data_parallel_size": 2}, 1, platform_name=platform)

    make.node_calls = 0
    return make


def test_rank_on_a_node_whose_npu_resource_counts_as_the_device_starts(rank_on_node) -> None:
    env: dict[str, str] = {plat.DEVICE_FROM_RAY_RESOURCE_ENV: "1"}
    rank = rank_on_node("npu", {"CPU": 4.0, "NPU": 1.0}, env)
    assert rank.platform.name == "npu" and env["ASCEND_RT_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize(
    ("resources", "env", "why"),
    [
        ({"CPU": 4.0, "NPU": 1.0}, {}, "counts as the device only with DPSERVE_DEVICE_FROM_RAY_RESOURCE=1"),
        ({"CPU": 4.0}, {plat.DEVICE_FROM_RAY_RESOURCE_ENV: "1"}, "advertises no Ray resource NPU"),
    ],
)
def test_rank_refuses_a_node_that_cannot_run_its_platform(rank_on_node, resources, env, why) -> None:
    with pytest.raises(
        plat.PlatformUnavailable, match=r"^node 10\.77\.0\.2 \(.*\) cannot run platform 'npu'"
    ) as err:
        rank_on_node("npu", resources, env)
    assert why in str(err.value)
    assert "ASCEND_RT_VISIBLE_DEVICES" not in env  # refused before it set anything


def test_cpu_rank_asks_nothing_about_its_node(rank_on_node) -> None:
    rank_on_node("cpu", {}, {})  # cpu runs anywhere: no lookup of the node
    assert rank_on_node.node_calls == 0
    rank_on_node("npu", {"NPU": 1.0}, {plat.DEVICE_FROM_RAY_RESOURCE_ENV: "1"})
    assert rank_on_node.node_calls == 1
