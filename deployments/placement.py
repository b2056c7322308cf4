"""Where DP ranks go: placement-group bundles per rank and the CPU cores or devices each rank gets."""

from __future__ import annotations

import json
import os
from typing import Any

from npu_runtime.platform import Platform, detect

# On CPU a rank's engine runs in its own processes pinned to its own cores; the Ray actor itself
# mostly waits on I/O. A fractional logical CPU keeps a 2-core machine from starving Serve's
# proxy and ingress (docs/design.md, "Measured facts": the logical-CPU trap).
CPU_RANK_LOGICAL_CPUS = 0.25
# Extra resources every rank bundle asks for, as JSON (e.g. '{"dpserve_host": 1}'): a custom
# resource each host declares once (`ray start --resources`) makes STRICT_SPREAD placement count
# hosts like NPUs do on Ascend; set where the ingress runs (the head's node environment).
RANK_RESOURCES_ENV = "DPSERVE_RANK_RESOURCES"


def rank_resources_from_env() -> dict[str, float]:
    """The DPSERVE_RANK_RESOURCES resources (empty when unset)."""
    raw = os.environ.get(RANK_RESOURCES_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise TypeError
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError):
        raise ValueError(
            f"{RANK_RESOURCES_ENV}={raw!r}: expected a JSON object of resource amounts"
        ) from None


def rank_bundle(
    platform: Platform, devices_per_rank: int = 1, extra: dict[str, float] | None = None
) -> dict[str, float]:
    """Resources one DP rank asks for: its accelerators (NPU/GPU) or a share of a CPU."""
    if platform.ray_resource == "CPU":
        bundle = {"CPU": CPU_RANK_LOGICAL_CPUS}
    else:
        bundle = {"CPU": 1.0, platform.ray_resource: float(devices_per_rank)}
    bundle.update(rank_resources_from_env())
    bundle.update(extra or {})
    return bundle


def rank_bundles(dp_size: int, platform: Platform | None = None, devices_per_rank: int = 1,
                 extra: dict[str, float] | None = None) -> list[dict[str, float]]:  # fmt: skip
    platform = platform or detect()
    return [rank_bundle(platform, devices_per_rank, extra) for _ in range(dp_size)]


def cpu_cores_for_rank(
    rank: int, dp_size: int, num_cores: int | None = None, binding: str = "shared"
) -> list[int]:
    """The cores rank `rank`'s engine may use on a CPU host.

    `shared`: every rank may use every core (what vLLM's own DP server does; ranks in lockstep MoE
    spend much of a step waiting in collectives, so sharing measured faster on 2 cores).
    `split`: cores are divided evenly over the ranks (each rank gets at least one).
    """
    num_cores = num_cores or os.cpu_count() or 1
    if binding == "shared":
        return list(range(num_cores))
    if binding != "split":
        raise ValueError(f"cpu_binding must be 'shared' or 'split', not {binding!r}")
    per_rank = max(1, num_cores // dp_size)
    start = (rank * per_rank) % num_cores
    return [(start + i) % num_cores for i in range(per_rank)]


def host_slots(node_of_rank: list[str]) -> list[tuple[int, int]]:
    """For each rank, (its index among the ranks on its host, how many ranks that host has), from
    the host each rank landed on (`node_of_rank[r]`); ranks are numbered in rank order per host.

    `cpu_cores_for_rank(index, count, <that host's cores>)` then gives a rank its cores: CPU binding
    is per host, so ranks spread over hosts each get their own host's cores."""
    slots = []
    for r, node in enumerate(node_of_rank):
        slots.append((node_of_rank[:r].count(node), node_of_rank.count(node)))
    return slots


def create_rank_placement_group(dp_size: int, strategy: str = "PACK", platform: Platform | None = None,
                                devices_per_rank: int = 1, extra: dict[str, float] | None = None,
                                name: str = "", timeout_s: float = 120.0) -> Any:  # fmt: skip
    """Reserve one bundle per DP rank. `STRICT_SPREAD` puts each rank on its own node."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(
        rank_bundles(dp_size, platform, devices_per_rank, extra), strategy=strategy, name=name
    )
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise TimeoutError(
            f"could not reserve {dp_size} DP-rank bundles {rank_bundles(dp_size, platform, devices_per_rank, extra)} "
            f"with strategy {strategy} within {timeout_s:.0f} s: check `ray status` for free resources"
        )
    return pg
