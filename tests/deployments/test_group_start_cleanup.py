"""A group start that fails leaves nothing behind: no rank actor, no EPLB actor, no placement group, with
balance and EPLB on; and every start's actor names are its own.

The rank and EPLB actors are light stand-ins (real Ray actors, no engines: a start costs seconds), put
in place of `DPRank` and `EplbActor` where `start_rank_group` creates them; everything else — the
placement group, the balance coordinator, the start sequence and its clean-up — is the real code.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import deployments.rank_group as rank_group
from deployments.config import DPServeConfig
from deployments.rank_group import RANK_NAMESPACE, group_name_prefix, named_rank_actors, start_rank_group

COORDINATOR = "dpserve_test_cleanup_coordinator"


def _settings() -> Any:
    return DPServeConfig.from_args({
        "engine": {"model": "/nonexistent", "data_parallel_size": 2},
        "balance": {"policy": "any_at_cap", "coordinator_name": COORDINATOR, "namespace": "dpserve_test"},
        "eplb": {"enabled": True, "autostart": False},
    }).rank_settings  # fmt: skip


def _stand_ins(fail: str):
    """A rank class and an EPLB actor class; `fail` names the step that raises: "rank_start" (one
    rank's engine start) or "eplb_initialize" (after the EPLB actor exists)."""
    import ray

    class Rank:
        def __init__(self, settings: Any, rank: int, *args: Any) -> None:
            self.rank = rank

        def reserve_dp_endpoint(self) -> tuple[str, int]:
            return "127.0.0.1", 1

        def start(self, address: str, port: int) -> dict[str, Any]:
            if fail == "rank_start" and self.rank == 1:
                raise RuntimeError("engine start failed")
            return {"rank": self.rank, "max_model_len": 512, "node_id": ""}

        def eplb_call(self, method: str, *args: Any) -> Any:
            return 0  # eplb_dp_steps: the group is idle

        def eplb_setup(self) -> dict[str, Any]:
            return {}

        def shutdown(self) -> None:
            pass

    class Eplb:
        def __init__(self, ranks: list[Any], config: dict[str, Any]) -> None:
            pass

        def initialize(self) -> None:
            if fail == "eplb_initialize":
                raise RuntimeError("ranks disagree on the expert placement")

        def stop(self) -> None:
            pass

    return ray.remote(Rank), ray.remote(Eplb)


def _release_coordinator() -> None:
    """Kill this module's coordinator and wait until its name is free for the next test."""

    from scheduler.coordinator import release_coordinator

    release_coordinator(COORDINATOR, "dpserve_test")
    _wait(lambda: COORDINATOR not in _named(COORDINATOR), "the coordinator's name stays taken")


def _named(prefix: str) -> list[str]:
    import ray

    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def _live_groups() -> set[str]:
    import ray

    return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def _wait(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.parametrize("fail", ["rank_start", "eplb_initialize"])
def test_failed_start_leaves_no_actor_or_placement_group(ray_local, monkeypatch: pytest.MonkeyPatch,
                                                         fail: str) -> None:  # fmt: skip
    import eplb.actor

    ray = ray_local
    rank_cls, eplb_cls = _stand_ins(fail)
    monkeypatch.setattr(rank_group, "rank_actor_class", lambda: rank_cls)
    monkeypatch.setattr(eplb.actor, "eplb_actor_class", lambda: eplb_cls)
    groups_before = _live_groups()
    prefix = group_name_prefix(1)
    try:
        with pytest.raises(RuntimeError, match="engine start failed|disagree"):
            asyncio.run(start_rank_group(_settings(), "PACK", prefix, start_timeout_s=60))
        # Kills are asynchronous: names and bundles are freed within moments.
        _wait(lambda: _named(prefix) == [], f"actors left: {_named(prefix)}")
        _wait(lambda: _live_groups() <= groups_before, "the placement group was not removed")
        assert rank_group._EPLB_ACTORS == {}
        # The balance coordinator outlives groups (one named actor, reset per group): still there.
        assert ray.get_actor(COORDINATOR, namespace="dpserve_test") is not None
    finally:
        _release_coordinator()


def test_every_start_has_its_own_names(ray_local, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two starts of the same generation (a retried start, or a new ingress replica beside a
    predecessor's leftovers) do not collide; `named_rank_actors` finds a generation's ranks."""
    rank_cls, eplb_cls = _stand_ins("none")
    monkeypatch.setattr(rank_group, "rank_actor_class", lambda: rank_cls)
    import eplb.actor

    monkeypatch.setattr(eplb.actor, "eplb_actor_class", lambda: eplb_cls)
    prefixes = {group_name_prefix(7) for _ in range(20)}
    assert len(prefixes) == 20 and all(p.startswith("dpserve_g7_") for p in prefixes)
    first, second = sorted(prefixes)[:2]
    groups = []
    try:
        for prefix in (first, second):
            groups.append(asyncio.run(start_rank_group(_settings(), "PACK", prefix, start_timeout_s=60)))
        assert sorted(_named(first)) == [f"{first}eplb", f"{first}rank0", f"{first}rank1"]
        assert len(_named(second)) == 3
        assert len(named_rank_actors(7, RANK_NAMESPACE)) == 2  # one per rank (the later start wins)
        # Every rank on the coordinator's node (one node here): the gate is served on loopback only.
        coordinator = ray_local.get_actor(COORDINATOR, namespace="dpserve_test")
        assert ray_local.get(coordinator.zmq_address.remote()).startswith("tcp://127.0.0.1:")
    finally:
        for actors, pg, _ in groups:
            asyncio.run(rank_group.stop_rank_group(actors, pg, timeout_s=10))
        _release_coordinator()
    _wait(lambda: _named(first) == [] and _named(second) == [], "actors left after stop")
