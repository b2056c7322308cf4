"""Serve replaces an ingress whose DP group cannot be re-formed, and the new replica serves.

The cause is real: after the app is up, the test reserves every free CPU of the node (a placement
group) and queues an actor for the CPUs the DP group's bundles hold. A rank actor is killed; the
ingress tears the old group down, and its bundles go to the queued actor, so the re-formation waits
for bundles it cannot get. Past `serving.max_recovery_s` the ingress's `check_health` raises; Serve
marks the replica unhealthy (after its consecutive-failure threshold), stops it (its `__del__` stops
the group) and starts a new replica, whose group waits for bundles in turn. Once the hog is released,
the new replica forms its group and serves; the old replica, its ranks, their engine processes and
every placement group of the old ingress are gone.

The app is served with Serve health checks every HEALTH_CHECK_PERIOD_S (the product's default is 10
s) so the test stays short; the product's other deployment options are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.helpers import (
    TINY_MODEL_NAME,
    app_rank_actors,
    app_status,
    engine_core_pid,
    process_gone,
    rank_placement_group_id,
    tiny_app_args,
    wait_for,
)

pytestmark = pytest.mark.slow

# One start attempt of the tiny 2-rank group must fit rank_start_timeout_s (the app's first start and
# the new replica's both take ~20-30 s here); max_recovery_s may not be shorter.
MAX_RECOVERY_S = 45.0
HEALTH_CHECK_PERIOD_S = 1.0
REPLICA_PREFIX = "SERVE_REPLICA::dpserve#DPServer#"


@pytest.fixture(scope="module")
def app_args(tiny_model_dir):
    return tiny_app_args(
        tiny_model_dir,
        serving={"rank_start_timeout_s": MAX_RECOVERY_S, "max_recovery_s": MAX_RECOVERY_S,
                 "recovery_wait_s": 2.0},
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_url(ray_local, app_args) -> Iterator[str]:
    from ray import serve

    from deployments.app import DPServer
    from deployments.config import DPServeConfig
    from deployments.rank import free_port

    config = DPServeConfig.from_args(app_args)
    app = DPServer.options(
        ray_actor_options={"num_cpus": config.serving.ingress_num_cpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=10,
    ).bind(config)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="dpserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _replicas(ray: Any) -> list[str]:
    """The names of the app's ingress replica actors alive now."""
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(REPLICA_PREFIX)
    )


def _live_groups(ray: Any) -> set[str]:
    """Ids of the placement groups not removed."""
    return {pg for pg, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}


def _reserve_free_cpus(ray: Any) -> Any:
    """A placement group holding every CPU the node has free now (whole CPUs, plus the rest)."""
    from ray.util.placement_group import placement_group

    free = ray.available_resources().get("CPU", 0.0)
    whole = math.floor(free)
    bundles = [{"CPU": 1.0}] * whole + ([{"CPU": round(free - whole, 4)}] if free - whole >= 1e-4 else [])
    pg = placement_group(bundles, strategy="PACK")
    assert ray.wait([pg.ready()], timeout=30)[0], f"could not reserve the free CPUs {bundles}"
    return pg


def test_ingress_stuck_in_recovery_is_replaced_and_the_new_replica_serves(base_url, ray_local) -> None:
    ray = ray_local
    before = app_status(base_url)
    assert not before["recovering"] and before["live_ranks"] == [0, 1], before
    old_replicas = _replicas(ray)
    assert len(old_replicas) == 1, old_replicas
    ranks = app_rank_actors(before)
    old_names = [r["actor_name"] for r in before["ranks"]]
    old_engines = [engine_core_pid(a)[1] for a in ranks]
    old_group = rank_placement_group_id(ranks[0])
    group_cpus = sum(
        b.get("CPU", 0.0) for b in ray.util.placement_group_table()[old_group]["bundles"].values()
    )

    # The hog: every free CPU now, and an actor queued for the group's CPUs, which it gets when the
    # ingress removes the old group's placement group.
    hog = _reserve_free_cpus(ray)
    pgs_before = _live_groups(ray)

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=group_cpus).remote()
    timeline: dict[str, float] = {}
    try:
        t_kill = time.monotonic()
        ray.kill(ranks[1])
        ray.get(holder.ready.remote(), timeout=60)  # the group's CPUs are the holder's now
        timeline["bundles_taken"] = time.monotonic() - t_kill
        stuck = app_status(base_url)
        assert stuck["recovering"] and stuck["live_ranks"] == [], stuck
        # The stuck ingress answers clearly meanwhile: 503 on /health, 503 for a request (it waits
        # `recovery_wait_s` for the group, then gives up).
        assert httpx.get(f"{base_url}/health", timeout=30).status_code == 503
        r = httpx.post(f"{base_url}/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "hi", "max_tokens": 2},
                       timeout=60)  # fmt: skip
        assert r.status_code == 503 and r.json()["error"]["message"], r.text

        # Serve sees check_health raise after max_recovery_s and starts a new replica.
        new_replicas = wait_for(
            "new ingress replica",
            MAX_RECOVERY_S + 60,
            lambda: [n for n in _replicas(ray) if n not in old_replicas],
        )
        timeline["new_replica"] = time.monotonic() - t_kill
        wait_for("end of the old replica", 60, lambda: old_replicas[0] not in _replicas(ray))
        timeline["old_replica_gone"] = time.monotonic() - t_kill
        assert _replicas(ray) == new_replicas
    finally:
        ray.kill(holder)
        ray.util.remove_placement_group(hog)
    t_release = time.monotonic()

    # The new replica forms its group and serves.
    after = wait_for("serving new replica", 180, lambda: _served(base_url))
    timeline["served_after_release"] = time.monotonic() - t_release
    print(f"\ningress stuck in recovery (max_recovery_s {MAX_RECOVERY_S:g}, health checks every "
          f"{HEALTH_CHECK_PERIOD_S:g} s): {({k: round(v, 1) for k, v in timeline.items()})}")  # fmt: skip
    assert MAX_RECOVERY_S <= timeline["new_replica"], timeline  # never before the bound
    assert _replicas(ray) == new_replicas
    assert after["live_ranks"] == [0, 1] and not after["recovering"], after
    new_names = [r["actor_name"] for r in after["ranks"]]
    assert not set(new_names) & set(old_names), (old_names, new_names)

    # Nothing of the old replica is left: its ranks (by name), their engine processes, its groups
    # (the old one and the one its stuck attempt asked for): the only placement group made since
    # the hog is the new replica's.
    prefix = old_names[0].removesuffix("rank0")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith(prefix)], (prefix, names)
    wait_for("end of the old engine processes", 30, lambda: all(process_gone(p) for p in old_engines))
    new_group = rank_placement_group_id(app_rank_actors(after)[0])
    assert _live_groups(ray) == (pgs_before - {old_group, hog.id.hex()}) | {new_group}, (
        pgs_before, old_group, new_group, ray.util.placement_group_table()
    )  # fmt: skip


def _served(url: str) -> dict[str, Any] | None:
    """The status of the app once a completion succeeds, else None."""
    try:
        r = httpx.post(f"{url}/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "after", "max_tokens": 4},
                       timeout=60)  # fmt: skip
    except httpx.HTTPError:
        return None
    return app_status(url) if r.status_code == 200 else None
