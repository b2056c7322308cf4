"""Fixtures for multi-host tests: a Ray cluster over network namespaces (cluster/netns.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.netns import HEAD_RESOURCE, HOST_RESOURCE


def _running_cluster(**kwargs: Any) -> Iterator[Any]:
    """A NetnsCluster(**kwargs) with Ray started on every host, torn down even on failure; skips
    where the harness cannot run."""
    from tests.cluster.netns import NetnsCluster, netns_supported

    reason = netns_supported()
    if reason:
        pytest.skip(f"multi-host harness unavailable: {reason}")
    with NetnsCluster(**kwargs) as cluster:
        cluster.start_ray()
        yield cluster


@pytest.fixture(scope="module")
def netns_ray_cluster():
    """Two test hosts (10.77.0.1 head, 10.77.0.2 worker) running Ray; torn down even on failure.

    Each host declares one HOST_RESOURCE, like an Ascend node declares its NPUs, and rank bundles
    ask for one (DPSERVE_RANK_RESOURCES), so STRICT_SPREAD placement is exercised as on hardware.
    Only the head declares HEAD_RESOURCE: the Serve ingress asks for a sliver of it so it stays
    where HTTP arrives, whichever other host is cut off."""
    yield from _running_cluster(
        num_hosts=2,
        resources={HOST_RESOURCE: 1},
        head_resources={HEAD_RESOURCE: 1},
        env={"DPSERVE_PLATFORM": "cpu", "DPSERVE_RANK_RESOURCES": json.dumps({HOST_RESOURCE: 1})},
    )


@pytest.fixture(scope="module")
def netns_npu_cluster():
    """Three test hosts running Ray: a head (10.77.0.1) without any NPU, and two hosts (10.77.0.2,
    .3) that advertise one custom `NPU` resource each; every host sets
    DPSERVE_DEVICE_FROM_RAY_RESOURCE=1, so a rank there takes that resource for the device (no
    torch-npu here). No DPSERVE_PLATFORM: the platform comes from the cluster's resources."""
    from deployments.placement import RANK_RESOURCES_ENV
    from npu_runtime.platform import DEVICE_FROM_RAY_RESOURCE_ENV, NPU, PLATFORM_ENV

    yield from _running_cluster(
        num_hosts=3,
        worker_resources={NPU.ray_resource: 1},
        num_cpus=2,
        # Empty is unset: whatever this shell exports, the cluster decides and bundles are plain.
        env={DEVICE_FROM_RAY_RESOURCE_ENV: "1", PLATFORM_ENV: "", RANK_RESOURCES_ENV: ""},
    )
