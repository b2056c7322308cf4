"""Fast checks behind the multi-host test: the namespace harness itself (no Ray) and how a rank
resolves its network identity (no vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deployments.placement import RANK_RESOURCES_ENV, rank_bundle, rank_resources_from_env
from npu_runtime import platform as plat
from tests.cluster.netns import HOST_IFNAME, NetnsCluster, netns_supported, tcp_reachable


def _netns_or_skip() -> None:
    reason = netns_supported()
    if reason:
        pytest.skip(f"multi-host harness unavailable: {reason}")


@pytest.mark.slow  # builds a three-host network-namespace cluster
def test_harness_links_cut_and_restore_and_teardown_leaves_nothing():
    _netns_or_skip()
    with NetnsCluster(num_hosts=3) as cluster:
        names = [h.netns for h in cluster.hosts]
        assert [h.ip for h in cluster.hosts] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        # Each host sees its own address on the test NIC, found by the code a rank uses.
        code = "from npu_runtime.platform import interface_for_ip; import sys; print(interface_for_ip(sys.argv[1]))"
        for h in cluster.hosts:
            out = subprocess.run(h.cmd([sys.executable, "-c", code, h.ip]),
                                 capture_output=True, text=True, timeout=60, env=cluster.host_env(h))  # fmt: skip
            assert out.stdout.strip() == HOST_IFNAME, out.stderr
        cluster.link_down(1)
        assert not tcp_reachable(cluster.hosts[1].ip) and tcp_reachable(cluster.hosts[2].ip)
        cluster.link_up(1)
        assert tcp_reachable(cluster.hosts[1].ip)
        bridge = cluster.bridge
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0


def test_host_network_env_per_platform():
    assert plat.host_network_env(plat.CPU, "127.0.0.1") == {
        "VLLM_HOST_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TP_SOCKET_IFNAME": "lo",
    }
    npu = plat.host_network_env(plat.NPU, "127.0.0.1")
    assert npu["HCCL_IF_IP"] == "127.0.0.1" and npu["HCCL_SOCKET_IFNAME"] == "lo"
    # An address no interface holds: advertise it, but name no NIC rather than a wrong one.
    assert plat.host_network_env(plat.CPU, "192.0.2.123") == {"VLLM_HOST_IP": "192.0.2.123"}
    assert plat.is_loopback_value("GLOO_SOCKET_IFNAME", "lo")
    assert plat.is_loopback_value("VLLM_HOST_IP", "127.0.0.1")
    assert not plat.is_loopback_value("VLLM_HOST_IP", "10.77.0.2")


@pytest.mark.parametrize(
    ("inherited", "expected_ip"),
    [
        ({}, "10.77.0.2"),  # nothing set: derived from the Ray node
        ({"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}, "10.77.0.2"),  # loopback: replaced
        ({"VLLM_HOST_IP": "10.99.0.7"}, "10.99.0.7"),  # an operator's real address: kept
    ],
)
def test_rank_resolves_its_network_env_from_the_ray_node(monkeypatch, inherited, expected_ip):
    import ray

    from deployments.rank import DPRank

    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME",
                                                                          "TP_SOCKET_IFNAME")} | inherited  # fmt: skip
    monkeypatch.setattr("os.environ", env)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.77.0.2")
    monkeypatch.setattr(plat, "interface_for_ip", lambda ip: "dps0" if ip == "10.77.0.2" else None)
    rank = DPRank({"data_parallel_size": 2}, 1, platform_name="cpu")
    assert env["VLLM_HOST_IP"] == expected_ip == rank.node_ip()
    if expected_ip == "10.77.0.2":
        assert env["GLOO_SOCKET_IFNAME"] == "dps0" and rank.network_info()["GLOO_SOCKET_IFNAME"] == "dps0"


def test_rank_bundle_takes_extra_resources_from_the_environment(monkeypatch):
    monkeypatch.setenv(RANK_RESOURCES_ENV, json.dumps({"dpserve_host": 1}))
    assert rank_resources_from_env() == {"dpserve_host": 1.0}
    assert rank_bundle(plat.CPU) == {"CPU": 0.25, "dpserve_host": 1.0}
    monkeypatch.setenv(RANK_RESOURCES_ENV, "[1]")
    with pytest.raises(ValueError, match=RANK_RESOURCES_ENV):
        rank_bundle(plat.CPU)
    monkeypatch.delenv(RANK_RESOURCES_ENV)
    assert rank_bundle(plat.CPU) == {"CPU": 0.25}
