"""Liveness and the internal channels through the serving app: 2 DP ranks + EP, balance and EPLB on, an
API key, real HTTP.

One app start for the module; the tests run in file order:
1. the API key: every route but /health refuses a request without it (401, OpenAI's body);
2. forged and malformed frames on every internal socket (each rank's output PULL socket at the
   ingress, each rank's request PULL socket, the balance coordinator's ROUTER socket) while a stream runs: dropped and counted, the
   stream completes with every token, nothing is re-formed, the coordinator's server still serves;
3. a lost output frame (rank 0 skips a frame number): its requests in flight end with a clear 503,
   rank 1's complete, nothing is re-formed;
4. one rank's engine frozen with SIGSTOP under load: declared hung within `serving.hang_timeout_s`
   (+ the stats poll), the group is re-formed, every request gets its tokens or a clear error, the
   frozen engine process and the old generation's actors and placement group are gone;
5. one rank actor killed under load (balance and EPLB on): nothing hangs, nothing is lost, requests sent
   while the group is broken wait for the re-formed group and succeed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
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
    request_completion,
    tiny_app_args,
)

pytestmark = pytest.mark.slow

KEY = "sk-liveness-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HANG_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 300  # a request not resolved by then counts as hung
EPLB = {"enabled": True, "num_redundant": 4, "policy": "deepseek", "window_steps": 20, "interval_s": 0.5,
        "threshold": 0.99, "window_samples": 4}  # fmt: skip


@pytest.fixture(scope="module")
def app_args(tiny_model_dir):
    return tiny_app_args(
        tiny_model_dir,
        engine={"enable_expert_parallel": True},
        balance={"policy": "any_at_cap"},
        eplb=EPLB,
        serving={"api_key": KEY, "hang_timeout_s": HANG_TIMEOUT_S},
    )


def _streams_while(base_url: str, n: int, fault: Callable[[], Awaitable[None]]) -> list[str]:
    """Start `n` streams of 160 tokens, run `fault()` once they have started, and return their
    outcomes (`request_completion`)."""

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            started = asyncio.Event()
            streams = [asyncio.create_task(request_completion(client, base_url, i, 160, stream=True,
                                                              started=started, api_key=KEY))
                       for i in range(n)]  # fmt: skip
            await asyncio.wait_for(started.wait(), REQUEST_TIMEOUT_S)
            await fault()
            return await asyncio.gather(*streams)

    return asyncio.run(scenario())


def test_api_key_on_every_route_but_health(base_url) -> None:
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    for path in ("/v1/models", "/dpserve/status"):
        r = httpx.get(f"{base_url}{path}", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert (
            httpx.get(f"{base_url}{path}", headers={"Authorization": "Bearer no"}, timeout=30).status_code
            == 401
        )
        assert httpx.get(f"{base_url}{path}", headers=AUTH, timeout=30).status_code == 200
    body = {"model": TINY_MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 401
    assert httpx.post(f"{base_url}/v1/completions", json=body, headers=AUTH, timeout=120).status_code == 200


def _send_junk(address: str, socket_type: int, messages: list[list[bytes]]) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    for parts in messages:
        sock.send_multipart(parts)
    sock.close()  # lingers until sent
    ctx.term()


def test_forged_and_malformed_frames_on_every_socket_are_dropped_and_counted(base_url) -> None:
    import msgspec
    import zmq

    from deployments.frame_sequence import SEQ
    from scheduler.frame_auth import FrameAuth, new_key
    from scheduler.gate_report import GateReport

    before = app_status(base_url, headers=AUTH)
    assert before["balance"]["zmq_server_alive"], before["balance"]
    outputs = {int(r): v["address"] for r, v in before["output_channel"]["ranks"].items()}
    assert len(outputs) == 2 and all(a and a.startswith("tcp://127.0.0.1:") for a in outputs.values()), (
        outputs
    )
    forged = FrameAuth(new_key())  # the right format, a key nobody in the group holds
    output_junk = [
        [b"garbage"],
        [b""],
        [b"two", b"parts"],
        # A chunk for a made-up request and stats claiming an idle rank.
        [
            forged.seal(
                SEQ.pack(10**6) + msgspec.msgpack.encode(([["cmpl-x", {"text": "pwned"}]], {"running": 0}))
            )
        ],
    ]
    at_cap = GateReport(0, 0, 10**6, running=10**6, waiting=10**6, max_num_seqs=1)  # would close the gate
    gate_junk = [[b"garbage"], [b"two", b"parts"], [forged.seal(at_cap.to_bytes())], [at_cap.to_bytes()],
                 [b"\x00" * 5000]]  # fmt: skip
    requests = {int(r): v["requests"] for r, v in before["output_channel"]["ranks"].items()}
    assert all(a and a.startswith("tcp://127.0.0.1:") for a in requests.values()), requests
    submit = ["submit", "cmpl-forged", "forged prompt", {"max_tokens": 4}, None, 0.0]
    request_junk = [[b"garbage"], [b"two", b"parts"], [forged.seal(SEQ.pack(0) + msgspec.msgpack.encode(submit))],
                    [SEQ.pack(0) + msgspec.msgpack.encode(submit)]]  # fmt: skip

    async def send_junk() -> None:
        for address in outputs.values():
            await asyncio.to_thread(_send_junk, address, zmq.PUSH, output_junk)
        for address in requests.values():
            await asyncio.to_thread(_send_junk, address, zmq.PUSH, request_junk)
        await asyncio.to_thread(_send_junk, before["balance"]["zmq_address"], zmq.DEALER, gate_junk)

    results = _streams_while(base_url, 2, send_junk)
    after = app_status(base_url, headers=AUTH)
    dropped = {r: v["dropped"] for r, v in after["output_channel"]["ranks"].items()}
    print(f"\nforged frames: streams {results}; output channel dropped {dropped}; "
          f"gate dropped {after['balance']['zmq_dropped']}")  # fmt: skip
    assert results == ["ok", "ok"]  # the streams beside the junk got every token
    for rank_dropped in dropped.values():  # each part of a multipart message is one frame here
        assert rank_dropped.get("unauthenticated", 0) >= len(output_junk) + 1, dropped
    assert after["output_channel"]["ranks"]["0"]["lost"] == 0
    # Each rank's request socket: all dropped, so the forged submit never ran (its stats reach the
    # ingress with its next output batch or poll).
    expected = {"dropped": {"unauthenticated": len(request_junk) + 1}, "lost": 0}
    deadline = time.monotonic() + 10
    while [{k: r.get("request_channel", {}).get(k) for k in expected} for r in after["ranks"]] != [
        expected
    ] * 2:
        assert time.monotonic() < deadline, after["ranks"]
        time.sleep(0.5)
        after = app_status(base_url, headers=AUTH)
    gate = after["balance"]
    # The 5000-byte frame exceeds the socket's message limit: libzmq drops its connection instead.
    assert (
        gate["zmq_dropped"].get("unauthenticated", 0) >= 3 and gate["zmq_dropped"].get("malformed", 0) >= 1
    ), gate
    assert gate["zmq_server_alive"] and gate["zmq_served"] > before["balance"]["zmq_served"]
    assert 10**6 not in [r["running"] for r in gate["ranks"].values()]  # the forged counts never landed
    assert after["group_generation"] == before["group_generation"] and after["recoveries"] == 0
    assert not after["recovering"] and after["live_ranks"] == [0, 1]


def test_a_lost_output_frame_ends_that_ranks_requests_with_a_clear_error(base_url, ray_local) -> None:
    """Rank 0 skips one output frame number (as if a frame were lost on the way): the ingress sees
    the gap, ends rank 0's requests in flight with a 503 error naming the loss and aborts them there;
    rank 1's requests complete; nothing is re-formed and the group serves on."""
    before = app_status(base_url, headers=AUTH)
    rank0 = app_rank_actors(before)[0]
    lost_before = before["output_channel"]["ranks"]["0"]["lost"]

    def skip_a_frame(rank: Any) -> int:
        rank.outbox.seq += 1
        return rank.outbox.seq

    async def lose_a_frame() -> None:
        await asyncio.sleep(1.0)  # every stream under way, on both ranks
        await asyncio.to_thread(ray_local.get, rank0.__ray_call__.remote(skip_a_frame), timeout=60)

    results = _streams_while(base_url, 4, lose_a_frame)
    after = app_status(base_url, headers=AUTH)
    print(f"\nlost output frame on rank 0: streams {results}; channel {after['output_channel']['ranks']}")
    assert after["output_channel"]["ranks"]["0"]["lost"] == lost_before + 1
    assert results.count("clear_error") >= 1 and set(results) <= {"ok", "clear_error"}, results
    assert results.count("ok") >= 1, results  # rank 1's requests were not touched
    assert after["group_generation"] == before["group_generation"] and after["recoveries"] == 0
    deadline = time.monotonic() + 30  # the aborted requests leave rank 0
    while any(r["in_flight"] for r in after["ranks"]):
        assert time.monotonic() < deadline, after["ranks"]
        time.sleep(0.5)
        after = app_status(base_url, headers=AUTH)
    r = httpx.post(f"{base_url}/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "after", "max_tokens": 4},
                   headers=AUTH, timeout=120)  # fmt: skip
    assert r.status_code == 200


def test_frozen_engine_is_declared_hung_and_the_group_recovers(base_url, ray_local) -> None:
    ray = ray_local
    before = app_status(base_url, headers=AUTH)
    generation = before["group_generation"]
    old_names = [r["actor_name"] for r in before["ranks"]]
    old_ranks = app_rank_actors(before)
    assert len(old_ranks) == 2
    _, frozen = engine_core_pid(old_ranks[1])
    old_group = rank_placement_group_id(old_ranks[0])
    timeline: dict[str, float] = {}

    async def scenario() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            started = asyncio.Event()
            first = [asyncio.create_task(request_completion(client, base_url, i, 300, stream=i % 2 == 0,
                                                            started=started, api_key=KEY))
                     for i in range(6)]  # fmt: skip
            await asyncio.wait_for(started.wait(), REQUEST_TIMEOUT_S)
            await asyncio.sleep(0.5)
            t_stop = time.monotonic()
            os.kill(frozen, signal.SIGSTOP)
            await asyncio.sleep(1.0)
            # Sent while the engine is frozen: wait for the re-formed group, then served there.
            late = [
                asyncio.create_task(
                    request_completion(client, base_url, 100 + i, 16, stream=False, api_key=KEY)
                )
                for i in range(2)
            ]
            deadline = t_stop + REQUEST_TIMEOUT_S
            while time.monotonic() < deadline:
                status = await asyncio.to_thread(app_status, base_url, AUTH)
                now = time.monotonic() - t_stop
                if status["recovering"] and "detected" not in timeline:
                    timeline["detected"] = now
                if status["group_generation"] > generation and not status["recovering"]:
                    timeline["re-formed"] = now
                    break
                await asyncio.sleep(0.5)
            return await asyncio.gather(*first), await asyncio.gather(*late)

    try:
        first, late = asyncio.run(scenario())
    finally:
        if not process_gone(frozen):
            os.kill(frozen, signal.SIGKILL)  # never leave a stopped process behind, even on failure
            left_behind = True
        else:
            left_behind = False
    after = app_status(base_url, headers=AUTH)
    report = {k: (first + late).count(k) for k in sorted(set(first + late))}
    print(f"\nSIGSTOP on rank 1's engine (hang_timeout_s {HANG_TIMEOUT_S:g}): {timeline}; requests {report}; "
          f"hung ranks detected {after['hung_ranks_detected']}")  # fmt: skip
    assert not left_behind, "the frozen engine process outlived its group"
    assert "detected" in timeline and "re-formed" in timeline, timeline
    # Stats are polled every 0.2 s while a rank has work; the status poll adds up to 0.5 s.
    assert HANG_TIMEOUT_S <= timeline["detected"] <= HANG_TIMEOUT_S + 5, timeline
    assert after["hung_ranks_detected"] >= 1 and after["live_ranks"] == [0, 1]
    assert set(report) <= {"ok", "clear_error"}, report  # nothing hung, truncated or lost
    assert late == ["ok", "ok"]
    # The old generation is gone: its actors (by name) and its placement group.
    group_prefix = old_names[0].removesuffix("rank0")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith(group_prefix)], (group_prefix, names)
    assert ray.util.placement_group_table()[old_group]["state"] == "REMOVED"
    new_group = rank_placement_group_id(app_rank_actors(after)[0])
    assert new_group != old_group and ray.util.placement_group_table()[new_group]["state"] == "CREATED"
    r = httpx.post(f"{base_url}/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "after", "max_tokens": 4},
                   headers=AUTH, timeout=120)  # fmt: skip
    assert r.status_code == 200


def test_rank_killed_under_load_nothing_lost_and_the_group_re_forms(base_url, ray_local) -> None:
    before = app_status(base_url, headers=AUTH)
    rank1 = app_rank_actors(before)[1]

    def request(client: httpx.AsyncClient, i: int, stream: bool) -> Awaitable[str]:
        return request_completion(client, base_url, i, 48, stream, prompt=f"request {i}", api_key=KEY,
                                  stream_usage=False)  # fmt: skip

    async def scenario() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            first = [asyncio.create_task(request(client, i, stream=i % 2 == 0)) for i in range(12)]
            await asyncio.sleep(1.0)
            ray_local.kill(rank1)
            # Arrives while the group is broken or being re-formed: must wait and succeed, not fail.
            await asyncio.sleep(2.0)
            late = [asyncio.create_task(request(client, 100 + i, stream=False)) for i in range(4)]
            return await asyncio.gather(*first), await asyncio.gather(*late)

    t0 = time.monotonic()
    first, late = asyncio.run(scenario())
    report = {k: (first + late).count(k) for k in sorted(set(first + late))}
    print(f"\nrank actor killed: sent 16, {report}, {time.monotonic() - t0:.0f} s")
    # None lost: each got its tokens or a clear error (nothing hung, truncated, miscounted or cut off).
    assert set(report) <= {"ok", "clear_error"} and sum(report.values()) == 16, report
    assert late == ["ok"] * 4  # requests that had not started went to the re-formed group
    after = app_status(base_url, headers=AUTH)
    assert after["group_generation"] == before["group_generation"] + 1, after["group_generation"]
    assert not after["recovering"] and after["live_ranks"] == [0, 1]
    r = httpx.post(f"{base_url}/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "after", "max_tokens": 4},
                   headers=AUTH, timeout=120)  # fmt: skip
    assert r.status_code == 200
