"""Fixtures for multi-host tests: a Ray cluster over network namespaces (cluster/netns.py)."""

from __future__ import annotations

import json

import pytest

from tests.cluster.netns import HEAD_RESOURCE, HOST_RESOURCE


@pytest.fixture(scope="module")
def netns_ray_cluster():
    """Two test hosts (10.77.0.1 head, 10.77.0.2 worker) running Ray; torn down even on failure.

    Each host declares one HOST_RESOURCE, like an Ascend node declares its NPUs, and rank bundles
    ask for one (DPSERVE_RANK_RESOURCES), so STRICT_SPREAD placement is exercised as on hardware.
    Only the head declares HEAD_RESOURCE: the Serve ingress asks for a sliver of it so it stays
    where HTTP arrives, whichever other host is cut off."""
    from tests.cluster.netns import NetnsCluster, netns_supported

    reason = netns_supported()
    if reason:
        pytest.skip(f"multi-host harness unavailable: {reason}")
    cluster = NetnsCluster(
        num_hosts=2,
        resources={HOST_RESOURCE: 1},
        head_resources={HEAD_RESOURCE: 1},
        env={"DPSERVE_PLATFORM": "cpu", "DPSERVE_RANK_RESOURCES": json.dumps({HOST_RESOURCE: 1})},
    )
    with cluster:
        cluster.start_ray()
        yield cluster
