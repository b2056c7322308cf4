"""End to end: the Serve app on loopback, 2 DP ranks (+EP) of the tiny model (this folder's app), the
official openai client."""

import asyncio
import json
import os
import time

import httpx
import openai
import pytest

from tests.deployments.openai_app.shared_app import MAX_MODEL_LEN, QUEUE_BOUND
from tests.helpers import app_rank_actors, app_status, engine_core_pid

pytestmark = pytest.mark.slow

MODEL = "dpserve-tiny-moe"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["live_ranks"] == [0, 1]


def test_completion_with_usage(client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    again = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic whichever rank serves it


def test_chat_and_streaming_chat(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_completion(client):
    stream = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    parts = [c.choices[0].text for c in stream]
    assert len("".join(parts)) > 0


def test_concurrent_requests_land_on_both_ranks(base_url):
    before = {r["rank"]: r["served"] for r in app_status(base_url)["ranks"]}

    async def go():
        c = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*[
            c.completions.create(model=MODEL, prompt=f"request {i} to the cluster", max_tokens=24,
                                 extra_body={"ignore_eos": True})
            for i in range(12)
        ])  # fmt: skip

    results = asyncio.run(go())
    assert all(r.usage.completion_tokens == 24 for r in results)
    status = app_status(base_url)
    after = {r["rank"]: r["served"] for r in status["ranks"]}
    assert all(after[r] - before[r] >= 3 for r in (0, 1)), (before, after)
    # They went to the ranks over each rank's request socket, not as Ray calls.
    channels = status["output_channel"]["ranks"]
    assert all(channels[r]["requests"].startswith("tcp://127.0.0.1:") for r in ("0", "1")), channels
    assert all(rank.get("request_channel") is None for rank in status["ranks"]), status["ranks"]
    assert all(channels[r]["submitted"]["socket"] >= 3 and channels[r]["submitted"]["ray"] == 0
               for r in ("0", "1")), channels  # fmt: skip


def test_client_disconnect_aborts_on_rank(base_url):
    body = {"model": MODEL, "prompt": "a long answer please", "max_tokens": MAX_MODEL_LEN - 16, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for i, _line in enumerate(resp.iter_lines()):
            if i >= 4:
                break  # leave mid-stream: closing the connection is the disconnect
    deadline = time.time() + 8
    while time.time() < deadline:
        ranks = app_status(base_url)["ranks"]
        if all(r["dispatched"] == 0 and r["in_flight"] == 0 and r["running"] == 0 for r in ranks):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"request still running after the client left: {ranks}")


@pytest.mark.parametrize(
    "payload, status",
    [
        ("{not json", 400),
        (json.dumps({"model": "no-such-model", "prompt": "x"}), 404),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -3}), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 10**6}), 400),
        (json.dumps({"model": MODEL, "prompt": "word " * 2000}), 400),
        (json.dumps({"model": MODEL, "prompt": ""}), 400),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}), 400),
        (json.dumps({"model": MODEL}), 400),
        (json.dumps({"model": MODEL, "messages": []}), 400),
    ],
    ids=[
        "malformed-json",
        "unknown-model",
        "wrong-type",
        "negative-max-tokens",
        "huge-max-tokens",
        "prompt-too-long",
        "empty-prompt",
        "bad-temperature",
        "missing-prompt",
        "empty-messages",
    ],  # fmt: skip
)
def test_bad_input_is_a_4xx_with_openai_error(base_url, payload, status):
    route = "/v1/chat/completions" if '"messages"' in payload else "/v1/completions"
    r = httpx.post(
        f"{base_url}{route}", content=payload, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"] and "ray::" not in err["message"]


def test_ranks_survive_bad_input(client, base_url):
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    r = client.completions.create(
        model=MODEL, prompt="still alive", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 4


def _scrape(metrics_port: int) -> dict[str, float]:
    """`{"name{label=value,...}": value}` for dpserve series (Ray adds its own labels; we keep ours)."""
    import re

    out = {}
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line.startswith("ray_dpserve_"):
            continue
        name, labels, value = re.match(r"(\w+)\{(.*)\} (\S+)$", line).groups()
        ours = ",".join(
            sorted(
                kv for kv in re.findall(r'(\w+="[^"]*")', labels) if kv.split("=")[0] in ("rank", "status")
            )
        )
        out[f"{name}{{{ours}}}"] = out.get(f"{name}{{{ours}}}", 0.0) + float(value)
    return out


def test_prometheus_metrics_match_traffic(client, base_url, metrics_port):
    for i in range(4):
        client.completions.create(
            model=MODEL, prompt=f"metrics {i}", max_tokens=3, extra_body={"ignore_eos": True}
        )
    served = sum(r["served"] for r in app_status(base_url)["ranks"])
    deadline = time.time() + 60
    while time.time() < deadline:  # Ray's metrics agent exports every few seconds
        m = _scrape(metrics_port)
        counted = sum(v for k, v in m.items() if k.startswith("ray_dpserve_requests_total{"))
        if counted == served:
            break
        time.sleep(2)
    else:
        pytest.fail(f"dpserve_requests_total says {counted}, the ingress served {served}: {m}")
    assert m.get('ray_dpserve_requests_total{rank="0",status="ok"}', 0) > 0
    assert m.get('ray_dpserve_requests_total{rank="1",status="ok"}', 0) > 0
    assert 'ray_dpserve_rank_running{rank="0"}' in m and 'ray_dpserve_rank_waiting{rank="1"}' in m
    assert m.get("ray_dpserve_ttft_ms_count{}", 0) > 0


def test_prometheus_has_coordinator_gate_figures(client, base_url, metrics_port, ray_local):
    """The app runs with balance on: the coordinator counts one gather per lockstep step that every
    live rank reported, observes its spread in dpserve_gate_gather_latency_ms, and Ray exports it."""
    from scheduler.coordinator import DEFAULT_NAME, DEFAULT_NAMESPACE

    coordinator = ray_local.get_actor(DEFAULT_NAME, namespace=DEFAULT_NAMESPACE)
    for _ in range(2):  # the ranks step (and report) only while they have work
        client.completions.create(model=MODEL, prompt="gather", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    stats = ray_local.get(coordinator.get_stats.remote())
    assert stats["gathers"] > 0, stats  # recorded in the coordinator
    deadline = time.time() + 60  # Ray's metrics agent exports every few seconds
    while _scrape(metrics_port).get("ray_dpserve_gate_gather_latency_ms_count{}", 0) == 0:
        assert time.time() < deadline, (
            f"{stats['gathers']} gathers recorded, none exported: {_scrape(metrics_port)}"
        )
        time.sleep(2)


def test_dpserve_status_cli(base_url, capsys):
    from cluster.cli import main

    assert main(["status", "--url", base_url]) == 0
    out = capsys.readouterr().out
    assert "DP 2" in out and "EP on" in out
    assert "gate: policy any_at_cap" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2


def test_overload_is_429_with_retry_after_and_bounded(base_url):
    """A burst of 5x the admission bound: the excess gets 429 + Retry-After, nothing else fails, and
    no rank ever holds more than the bound."""
    peak = {"dispatched": 0}

    async def watch(stop: asyncio.Event):
        async with httpx.AsyncClient(timeout=10) as c:
            while not stop.is_set():
                ranks = (await c.get(f"{base_url}/dpserve/status")).json()["ranks"]
                peak["dispatched"] = max(peak["dispatched"], *(r["dispatched"] for r in ranks))
                await asyncio.sleep(0.05)

    async def burst():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=400)) as c:
            body = {"model": MODEL, "prompt": "burst", "max_tokens": 16, "ignore_eos": True}
            rs = await asyncio.gather(
                *[c.post(f"{base_url}/v1/completions", json=body) for _ in range(5 * 2 * QUEUE_BOUND)]
            )
        stop.set()
        await watcher
        return rs

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) > 0 and codes.count(200) >= 2 * QUEUE_BOUND
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
    assert peak["dispatched"] <= QUEUE_BOUND


def _bounded(d: dict) -> bytes:
    """Keep fuzzed requests cheap: at most 8 new tokens (negative and huge negative values stay)."""
    d = {k: v for k, v in d.items() if k != "max_completion_tokens"}
    if not (
        isinstance(d.get("max_tokens"), int)
        and not isinstance(d["max_tokens"], bool)
        and d["max_tokens"] <= 8
    ):
        d["max_tokens"] = 4
    return json.dumps(d).encode()


def _fuzz_bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=40), st.just(MODEL))  # fmt: skip
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    )  # fmt: skip
    keys = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n",
                            "stream", "stop", "seed", "logprobs", "ignore_eos", "stream_options", "unknown_field"])  # fmt: skip
    small_valid = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.text(max_size=30),
                                         "max_tokens": st.integers(-5, 8)})  # fmt: skip
    json_bodies = st.one_of(small_valid, st.dictionaries(keys, values, max_size=6)).map(_bounded)
    return st.one_of(json_bodies, st.binary(max_size=60))  # raw bytes: bad UTF-8, broken JSON


def test_fuzzed_requests_never_5xx(base_url):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = httpx.Client(timeout=60)

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=_fuzz_bodies(), chat=st.booleans())
    def check(body, chat):
        route = "/v1/chat/completions" if chat else "/v1/completions"
        r = client.post(f"{base_url}{route}", content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]

    check()
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200  # no rank died


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering an engine's niceness needs root or CAP_SYS_NICE")
def test_engines_run_ahead_of_rays_workers(base_url):
    """With engine_nice 0 (this folder's app), engine cores at 0, their rank actors at Ray's 15."""
    # This app's rank actors only (other modules' engine groups may still be exiting, and other
    # sessions may run engines on the same machine).
    pairs = [engine_core_pid(actor) for actor in app_rank_actors(app_status(base_url))]
    assert len(pairs) == 2, pairs
    for rank_pid, pid in pairs:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
        assert os.getpriority(os.PRIO_PROCESS, rank_pid) == 15
