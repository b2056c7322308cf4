"""A DP rank dies under load: nothing hangs, nothing is lost, the group is re-formed and serves again."""

import asyncio
import time

import httpx
import pytest

from tests.helpers import app_rank_actors, request_completion

pytestmark = pytest.mark.slow

MODEL = "dpserve-tiny-moe"
REQUEST_TIMEOUT_S = 240  # a request not resolved by then counts as hung


@pytest.fixture(scope="module")
def base_url(ray_local, tiny_model_dir):
    from ray import serve

    from deployments.app import build_app
    from deployments.rank import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"engine": {"model": tiny_model_dir, "served_model_name": MODEL, "data_parallel_size": 2,
                                "enable_expert_parallel": True, "max_model_len": 512, "max_num_seqs": 8}})  # fmt: skip
    serve.run(app, name="dpserve_failure", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    # Shut Serve down, not just the app: a later module's serve.start() with its own port would
    # otherwise be ignored and its requests would go to this module's proxy port.
    serve.shutdown()


async def _request(client: httpx.AsyncClient, url: str, i: int, stream: bool) -> str:
    """48 tokens; outcomes as `request_completion` says, in this test's terms: a wrong token count is
    'wrong' and every httpx error but a timeout is one 'connection_error'."""
    outcome = await request_completion(client, url, i, 48, stream, prompt=f"request {i}", stream_usage=False)
    if outcome.startswith("connection_error"):
        return "connection_error"
    return "wrong" if outcome == "wrong_count" else outcome


def test_rank_killed_under_load(base_url, ray_local):
    ray = ray_local
    rank1 = app_rank_actors(httpx.get(f"{base_url}/dpserve/status", timeout=30).json())[1]

    async def scenario():
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            first = [asyncio.create_task(_request(client, base_url, i, stream=i % 2 == 0)) for i in range(12)]
            await asyncio.sleep(1.0)
            ray.kill(rank1)
            # Arrives while the group is broken or being re-formed: must wait and succeed, not fail.
            await asyncio.sleep(2.0)
            late = [asyncio.create_task(_request(client, base_url, 100 + i, stream=False)) for i in range(4)]
            return await asyncio.gather(*first), await asyncio.gather(*late)

    t0 = time.time()
    first, late = asyncio.run(scenario())
    report = {k: first.count(k) + late.count(k) for k in ("ok", "clear_error", "unclear_error", "truncated",
                                                         "wrong", "hung", "connection_error")}  # fmt: skip
    print(f"\nrank failure: sent 16, {report}, {time.time() - t0:.0f} s")
    assert report["hung"] == 0 and report["truncated"] == 0 and report["unclear_error"] == 0
    assert report["wrong"] == 0 and report["connection_error"] == 0
    assert report["ok"] + report["clear_error"] == 16, report  # none lost: each got an answer or an error
    assert late == ["ok"] * 4  # requests that had not started went to the re-formed group

    status = httpx.get(f"{base_url}/dpserve/status", timeout=10).json()
    assert status["group_generation"] == 2 and not status["recovering"] and status["live_ranks"] == [0, 1]
    r = httpx.post(
        f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200
