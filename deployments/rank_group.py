"""Start and hold the N DP-rank actors of one model."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

from deployments.config import BalanceSection, EngineSettings, EplbSection
from deployments.placement import create_rank_placement_group, host_slots, rank_bundle
from deployments.rank import DPRank
from npu_runtime.platform import Platform, choose_platform
from scheduler.frame_auth import new_key

logger = logging.getLogger("dpserve.rank_group")

RANK_NAMESPACE = "dpserve"  # named rank actors live here, whichever job created them


def rank_actor_class():
    import ray

    return ray.remote(DPRank)


def _host_slots(pg: Any, n: int) -> list[tuple[int, int]]:
    """(index on its host, ranks on that host) per rank, from where the placement group's bundles
    landed."""
    import ray

    nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return host_slots([nodes[r] for r in range(n)])


def group_platform(settings: EngineSettings) -> tuple[Platform, str]:
    """The platform of a group's ranks, and where the choice came from: `engine.platform` when set,
    else DPSERVE_PLATFORM in this process, else the cluster's Ray resources (any NPU: npu, else any
    GPU: cuda, else cpu). Never this process's own devices: the ingress may run on a head node
    without accelerators while the ranks go to nodes with them. Calls Ray (in a thread from async)."""
    import ray

    return choose_platform(settings.platform, ray.cluster_resources)


def group_name_prefix(generation: int) -> str:
    """The name prefix of one start of a group: `dpserve_g<generation>_<random>_`. Operators find a
    generation's ranks by `dpserve_g<generation>_`; the random part keeps every start's names
    distinct (a retried start, or a new ingress replica, never meets a predecessor's leftovers)."""
    return f"dpserve_g{generation}_{secrets.token_hex(3)}_"


def named_rank_actors(generation: int, namespace: str = RANK_NAMESPACE) -> list[Any]:
    """The rank actors of group generation `generation`, by rank (for operators and tests; with
    several dpserve applications in one cluster, each has its own generation 1)."""
    import ray

    pattern = re.compile(rf"dpserve_g{generation}_[0-9a-f]+_rank(\d+)$")
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        match = pattern.match(entry["name"])
        if match and entry["namespace"] == namespace:
            found[int(match.group(1))] = ray.get_actor(entry["name"], namespace=namespace)
    return [found[r] for r in sorted(found)]


async def start_rank_group(
    settings: EngineSettings,
    placement_strategy: str = "PACK",
    name_prefix: str = "",
    start_timeout_s: float = 600.0,
) -> tuple[list[Any], Any, list[dict[str, Any]]]:
    """Create one actor per DP rank in a placement group and start their engines together.

    Returns (actors, placement group, per-rank start info). Rank 0 hosts vLLM's DP handshake: its
    address and a free port are asked from rank 0's actor, so this works across nodes. If anything
    fails on the way, whatever was created (rank actors, the EPLB actor, the placement group) is
    removed before the error is raised.

    The ranks' platform (their bundles, engine defaults, the check each rank makes on its node) is
    `group_platform(settings)`; the ranks get settings with `platform` filled in.
    """
    platform, source = await asyncio.to_thread(group_platform, settings)
    logger.info("DP ranks on platform %s (from %s)", platform.name, source)
    settings = settings.model_copy(update={"platform": platform.name})
    n = settings.data_parallel_size
    if settings.balance is not None:
        # The coordinator is one named actor that outlives groups (reset for each): not this
        # start's to remove.
        settings = await start_balance_coordinator(settings)
    # In a thread: waiting for bundles (up to its timeout, e.g. while a host is down) must not
    # block the caller's event loop (the ingress keeps answering, with 503s, meanwhile). It removes
    # its placement group itself when it times out.
    pg = await asyncio.to_thread(
        create_rank_placement_group, n, strategy=placement_strategy, platform=platform
    )
    actors: list[Any] = []
    try:
        if settings.balance is not None:
            await bind_balance_coordinator(settings.balance, pg, n)
        infos = await _start_ranks(settings, pg, platform, actors, name_prefix, start_timeout_s)
        if settings.eplb_enabled and settings.eplb.setup_on_start:
            await start_eplb(actors, settings, name_prefix)
    except BaseException:
        # Shut down what was made (engines included: an engine process outlives a killed actor),
        # shielded: a cancelled start is cleaned up all the same.
        await asyncio.shield(stop_rank_group(actors, pg, timeout_s=10))
        raise
    return actors, pg, infos


async def _start_ranks(settings: EngineSettings, pg: Any, platform: Platform, actors: list[Any],
                       name_prefix: str, start_timeout_s: float) -> list[dict[str, Any]]:  # fmt: skip
    """Create the rank actors (appended to `actors` as they are made, for the caller's clean-up)
    and start their engines; returns their start info."""
    n = settings.data_parallel_size
    await create_rank_actors(settings, pg, platform, actors, name_prefix)

    async def start() -> list[dict[str, Any]]:
        dp_address, dp_port = await actors[0].reserve_dp_endpoint.remote()
        return list(await asyncio.gather(*[a.start.remote(dp_address, dp_port) for a in actors]))

    infos = await asyncio.wait_for(start(), timeout=start_timeout_s)
    logger.info("started %d DP ranks: %s", n, infos)
    return infos


async def create_rank_actors(settings: EngineSettings, pg: Any, platform: Platform, actors: list[Any],
                             name_prefix: str = "") -> list[Any]:  # fmt: skip
    """One rank actor per bundle of `pg`, asking for its bundle's resources; appended to `actors` as
    they are made (for the caller's clean-up). Each checks, on its node, that the node can run
    `platform` (npu_runtime.platform.check_node_runs) before anything else; no engine starts."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = settings.data_parallel_size
    actor_cls = rank_actor_class()
    slots = await asyncio.to_thread(_host_slots, pg, n) if platform.name == "cpu" else [None] * n
    for r in range(n):
        bundle = rank_bundle(platform)
        opts: dict[str, Any] = {
            "num_cpus": bundle.get("CPU", 0),
            "resources": {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            "max_concurrency": 1000,
        }
        if "GPU" in bundle:
            opts["num_gpus"] = bundle["GPU"]
        if name_prefix:
            opts["name"] = f"{name_prefix}rank{r}"
            opts["namespace"] = RANK_NAMESPACE
        # Each rank picks its cores on its own host (this process may run on another one).
        actors.append(actor_cls.options(**opts).remote(settings, r, None, platform.name, slots[r]))
    return actors


async def wait_group_idle(
    actors: list[Any], quiet_s: float = 1.0, poll_s: float = 0.25, timeout_s: float = 300.0
) -> list[int]:
    """Wait until no rank's DP step counter has moved for `quiet_s`: the DP wave has ended on every
    rank. A rank whose own requests are done keeps stepping dummy batches until the wave ends, and a
    collective started on one rank between steps (EPLB set-up's process group) while a peer is
    inside a step's all-reduce deadlocks both until gloo's timeout. Returns the counters."""
    deadline = time.monotonic() + timeout_s
    last = await asyncio.gather(*[a.eplb_call.remote("eplb_dp_steps") for a in actors])
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the DP group kept stepping for {timeout_s:.0f} s (steps {last})")
        await asyncio.sleep(poll_s)
        now = await asyncio.gather(*[a.eplb_call.remote("eplb_dp_steps") for a in actors])
        if now != last:
            last, quiet_since = now, time.monotonic()
    return list(last)


# EPLB actor per rank group, keyed by the rank-0 actor id (stop_rank_group kills it with the group).
_EPLB_ACTORS: dict[str, Any] = {}


def _group_key(actors: list[Any]) -> str:
    return actors[0]._actor_id.hex()


async def start_eplb(actors: list[Any], settings: EngineSettings, name_prefix: str = "") -> Any:
    """Install EPLB slots/tables on every rank (together, while the group is idle), then create the
    EPLB actor for the group and start its background cycles unless `eplb.autostart` is off."""
    from eplb.actor import eplb_actor_class

    cfg = settings.eplb or EplbSection()
    await wait_group_idle(actors)
    await asyncio.gather(*[a.eplb_setup.remote() for a in actors])
    # Restartable: it gets the rank handles and config as constructor arguments, so a restarted
    # actor re-initializes from the ranks and resumes (eplb.actor.EplbActor). Calls made while it is
    # down fail (nobody waits on it on the serving path); stop_rank_group's ray.kill ends it for good.
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": cfg.max_restarts}
    if name_prefix:
        opts["name"] = f"{name_prefix}eplb"
    controller = eplb_actor_class().options(**opts).remote(actors, cfg.model_dump())
    # Registered at once: if initializing fails, the group's clean-up still finds (and kills) it.
    _EPLB_ACTORS[_group_key(actors)] = controller
    await controller.initialize.remote()
    if cfg.autostart:
        await controller.start.remote()
    return controller


def get_eplb_actor(actors: list[Any]) -> Any | None:
    """The EPLB actor of the group whose ranks are `actors` (None when EPLB is off)."""
    return _EPLB_ACTORS.get(_group_key(actors)) if actors else None


async def start_balance_coordinator(settings: EngineSettings) -> EngineSettings:
    """Start (or reuse, by name) the BalanceCoordinator actor for `settings.balance`, reset it for a
    new group, and return settings whose balance block tells the engines how to reach it."""
    import ray

    from scheduler.coordinator import get_or_create_coordinator

    balance = settings.balance or BalanceSection()
    # The engines reach the coordinator by name; the engine core is a subprocess of the rank actor,
    # not a Ray worker: it joins by GCS address.
    ray_address = balance.ray_address or ray.get_runtime_context().gcs_address
    balance = balance.model_copy(update={"coordinator_name": balance.coordinator_name,
                                         "namespace": balance.namespace, "ray_address": ray_address})  # fmt: skip
    # get_or_create_coordinator waits on Ray (actor creation, set_policy): in a thread, so the
    # caller's event loop (the ingress) keeps serving meanwhile.
    coordinator = await asyncio.to_thread(
        get_or_create_coordinator,
        balance.coordinator_name,
        balance.namespace,
        balance.policy,
        balance.params,
        balance.timeout_s,
    )
    # A new group starts its waves at 0 again, with its own key for the gate's frames (the ranks'
    # engines fetch it from the actor through Ray: scheduler/gate_transport.py).
    await coordinator.reset.remote(new_key())
    return settings.model_copy(update={"balance": balance})


async def bind_balance_coordinator(balance: BalanceSection, pg: Any, n: int) -> None:
    """Have the coordinator serve the gate on loopback when every rank's bundle is on its node (no
    other node needs to reach it), else on its node's address. Before the engines start: they look
    the address up as they start."""
    import ray

    coordinator = ray.get_actor(balance.coordinator_name, namespace=balance.namespace)
    nodes = set((await asyncio.to_thread(ray.util.placement_group_table, pg))["bundles_to_node_id"].values())
    here = await coordinator.node_id.remote()
    address = await coordinator.bind.remote(nodes == {here})
    logger.info("balance gate served at %s (%d ranks on nodes %s)", address, n, sorted(nodes))


async def stop_rank_group(actors: list[Any], pg: Any | None = None, timeout_s: float = 30.0) -> None:
    """Shut the engines down (their subprocesses exit with them), then free the actors and bundles."""
    import ray

    controller = _EPLB_ACTORS.pop(_group_key(actors), None) if actors else None
    if controller is not None:  # stop planning before the ranks go away
        try:
            await asyncio.wait_for(controller.stop.remote(), 15)
        except Exception:
            logger.warning("EPLB actor did not stop cleanly; killing it")
        ray.kill(controller)
    try:
        await asyncio.wait_for(
            asyncio.gather(*[a.shutdown.remote() for a in actors], return_exceptions=True), timeout_s
        )
    except TimeoutError:
        logger.warning("DP ranks did not shut down within %.0f s; killing them", timeout_s)
    for a in actors:
        ray.kill(a)
    if pg is not None:
        ray.util.remove_placement_group(pg)
