"""The ranks' platform comes from the cluster, not from the ingress's node (issue #20, item 3).

Three test hosts (network namespaces, tests/cluster/netns.py): a head without any NPU, where the
driver (standing in for the ingress) runs, and two hosts advertising a custom `NPU` resource. No
vLLM engine: the group's platform is chosen as `start_rank_group` chooses it
(`deployments.rank_group.group_platform`), its placement group is made by
`deployments.placement.create_rank_placement_group`, and its rank actors by
`deployments.rank_group.create_rank_actors`; each rank actor checks its node as it is constructed.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.netns import json_result

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Runs on the head. Prints, per case, the platform and its source, the bundles asked for, the
# address of the node each bundle landed on, and per rank actor its node address or its error.
DRIVER = """
import asyncio, json, sys, ray
from deployments.config import DPServeConfig
from deployments.placement import create_rank_placement_group
from deployments.rank_group import create_rank_actors, group_platform, stop_rank_group

ray.init(runtime_env={"env_vars": json.loads(sys.argv[1])})
ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
out = {}
for case, engine in json.loads(sys.argv[2]).items():
    settings = DPServeConfig.from_args({"engine": {"data_parallel_size": 2, **engine}}).rank_settings
    platform, source = group_platform(settings)
    pg = create_rank_placement_group(2, platform=platform, timeout_s=60)
    table = ray.util.placement_group_table(pg)
    actors = []
    ranks = []
    try:
        settings = settings.model_copy(update={"platform": platform.name})
        asyncio.run(create_rank_actors(settings, pg, platform, actors))
        for actor in actors:
            try:
                ranks.append({"node_ip": ray.get(actor.network_info.remote(), timeout=120)["node_ip"]})
            except Exception as exc:
                ranks.append({"error": str(exc)})
    finally:
        asyncio.run(stop_rank_group(actors, pg, timeout_s=10))
    out[case] = {"platform": platform.name, "source": source,
                 "bundles": [table["bundles"][i] for i in range(2)],
                 "nodes": [ip_of[table["bundles_to_node_id"][i]] for i in range(2)], "ranks": ranks}
print(json.dumps(out))
"""


def _drive(cluster, env_vars: dict[str, str], cases: dict[str, dict]) -> dict:
    code = f"import sys; sys.argv[1:] = {[json.dumps(env_vars), json.dumps(cases)]!r}\n" + DRIVER
    res = cluster.run_python(0, code, timeout_s=300)
    return json_result(res.stdout)


def test_npu_ranks_land_on_npu_hosts_and_the_config_decides(netns_npu_cluster):
    cluster = netns_npu_cluster
    head = cluster.head.ip
    npu_hosts = sorted(h.ip for h in cluster.hosts[1:])
    out = _drive(cluster, {}, {"cluster": {}, "config_cpu": {"platform": "cpu"}})

    # Unset engine.platform: the cluster's resources decide (NPU somewhere), not the head's devices.
    auto = out["cluster"]
    assert (auto["platform"], auto["source"]) == ("npu", "cluster resources {'NPU': 2.0}")
    assert auto["bundles"] == [{"CPU": 1.0, "NPU": 1.0}] * 2
    assert sorted(auto["nodes"]) == npu_hosts and head not in auto["nodes"]
    # Each rank started on its bundle's NPU host; its node check took the resource for the device.
    assert [r.get("node_ip") for r in auto["ranks"]] == auto["nodes"], auto["ranks"]

    # engine.platform: cpu in the Serve config: CPU bundles, whatever the cluster has.
    cpu = out["config_cpu"]
    assert (cpu["platform"], cpu["source"]) == ("cpu", "engine.platform")
    assert cpu["bundles"] == [{"CPU": 0.25}] * 2
    assert [r.get("node_ip") for r in cpu["ranks"]] == cpu["nodes"], cpu["ranks"]


def test_rank_refuses_an_npu_host_whose_resource_is_not_a_device(netns_npu_cluster):
    """With DPSERVE_DEVICE_FROM_RAY_RESOURCE off (here for the driver's job), an NPU host without
    torch-npu cannot run npu: each rank refuses to start, naming its node and the platform."""
    cluster = netns_npu_cluster
    from npu_runtime.platform import DEVICE_FROM_RAY_RESOURCE_ENV

    out = _drive(cluster, {DEVICE_FROM_RAY_RESOURCE_ENV: "0"}, {"cluster": {}})["cluster"]
    assert out["platform"] == "npu" and sorted(out["nodes"]) == sorted(h.ip for h in cluster.hosts[1:])
    for node, rank in zip(out["nodes"], out["ranks"], strict=True):
        error = rank.get("error", "")
        assert f"node {node} " in error and "cannot run platform 'npu'" in error, rank
        assert f"{DEVICE_FROM_RAY_RESOURCE_ENV}=1" in error, rank
