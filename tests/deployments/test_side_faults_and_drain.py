"""Faults beside the ranks, on the real app (2 DP ranks + EP, EPLB on, real HTTP), and graceful shutdown.

One app start for the module (45-90 s here); the tests run in file order and the last ones end it:
1. the EPLB actor is killed while requests flow: every request still succeeds, Ray restarts the
   actor, it re-initializes from the ranks and plans again on the windows it pulls;
2. drain (what `dpserve shutdown` and `dpserve serve`'s SIGTERM handler do first): streams in
   flight finish with every token, new API requests get 503 + Retry-After, nothing hangs — through
   Serve's proxy and through the ingress replica's own port (direct ingress);
3. `serve.delete` with streams in flight (Serve's own drain, `graceful_shutdown_timeout_s`): they
   finish, then the ingress stops the rank group;
4. SIGTERM to `dpserve serve` (a subprocess running `serve run` on this Ray): drained, then shut down;
5. `dpserve shutdown` (the command, a subprocess) against a running app (1 rank, started after 4
   ended Serve): in-flight streams finish, new requests get 503 + Retry-After on both ports, Serve ends.

Serve runs with dpserve's Serve options (`deployments.serve_env.SERVE_ENV`: direct ingress on, as
`dpserve serve` runs it), handed to Serve's controller through `controller_options` (it inherits
them to the proxy and the replicas); the ingress replica's own port range is picked free here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import app_rank_actors, app_status, request_completion

pytestmark = pytest.mark.slow

MODEL = "dpserve-tiny-moe"
APP = "dpserve_side"
REQUEST_TIMEOUT_S = 120  # a request not resolved by then counts as hung
EPLB = {"enabled": True, "num_redundant": 4, "policy": "deepseek", "window_steps": 20, "interval_s": 0.5,
        "threshold": 0.99, "window_samples": 4, "resume_retry_s": 0.5}  # fmt: skip


def _app_args(model: str, engine: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return {"engine": {"model": model, "served_model_name": MODEL, "data_parallel_size": 2, "enable_expert_parallel": True,
                       "max_model_len": 512, "max_num_seqs": 8, **(engine or {})}, **sections}  # fmt: skip


def _start_serve(port: int, env: dict[str, str]) -> None:
    """A clean Serve: proxy on `port`, controller (and through it proxies and replicas) with `env`.
    serve.start() ignores http_options/controller_options while Serve already runs (an earlier
    module's instance on another port), hence the shutdown first."""
    from ray import serve

    serve.shutdown()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        controller_options={"runtime_env": {"env_vars": env}},
    )


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_dir):
    from ray import serve

    from deployments.app import build_app
    from deployments.rank import free_port
    from deployments.serve_env import SERVE_ENV, direct_ingress_url

    port, direct_port = free_port(), free_port()
    env = dict(SERVE_ENV, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(direct_port),
               RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(direct_port + 50))  # fmt: skip
    direct_url = direct_ingress_url(env=env)
    assert direct_url is not None, "dpserve's Serve options no longer turn direct ingress on"
    _start_serve(port, env)
    serve.run(build_app(_app_args(tiny_model_dir, eplb=EPLB)), name=APP, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "model": tiny_model_dir, "env": env,
           "direct_url": direct_url}  # fmt: skip
    try:
        if APP in serve.status().applications:
            serve.delete(APP)
    except Exception:  # the last test shut Serve down
        pass


# Refusals by HTTP status (the drain tests expect 503s); error events as "error_event".
_request = functools.partial(request_completion, errors="status")


async def _one_request(url: str) -> str:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        return await _request(client, url, 0, 8, stream=False)


def _eplb_actor(ray, url: str) -> Any:
    """This app's EPLB actor: named like its ranks (`<group prefix>eplb`)."""
    name = app_status(url)["ranks"][0]["actor_name"].removesuffix("rank0") + "eplb"
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    assert len(found) == 1, (name, found)
    return ray.get_actor(name, namespace=found[0]["namespace"])


def test_eplb_actor_killed_serving_continues_and_it_resumes(served, ray_local):
    ray = ray_local
    url = served["url"]
    timeline: list[tuple[float, dict | None]] = []

    async def scenario() -> tuple[list[str], float, float | None, float | None]:
        stop = asyncio.Event()
        results: list[str] = []

        async def client_loop(c: int) -> None:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
                i = 0
                while not stop.is_set():
                    results.append(await _request(client, url, 1000 * c + i, 24, stream=i % 2 == 0))
                    i += 1

        loops = [asyncio.create_task(client_loop(c)) for c in range(4)]
        await asyncio.sleep(3.0)  # traffic flowing, the actor collecting
        before = (await asyncio.to_thread(app_status, url))["eplb"]
        assert before.get("phase") and not before.get("restarted"), before
        t_kill = time.monotonic()
        ray.kill(_eplb_actor(ray, url), no_restart=False)  # a crash: Ray restarts it (max_restarts)
        back_at = decided_at = None
        deadline = t_kill + 150
        while time.monotonic() < deadline:
            state = (await asyncio.to_thread(app_status, url))["eplb"]
            timeline.append((time.monotonic() - t_kill, state))
            if back_at is None and state.get("restarted") and state.get("alive"):
                back_at = time.monotonic() - t_kill
            # A decision on a full window pulled after the restart: committed or judged not worth it.
            if back_at is not None and (
                state.get("rebalances", 0) >= 1 or state.get("skipped_no_gain", 0) >= 1
            ):
                decided_at = time.monotonic() - t_kill
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(5.0)  # and serving goes on after it
        stop.set()
        await asyncio.gather(*loops)
        return results, time.monotonic() - t_kill, back_at, decided_at

    results, total_s, back_at, decided_at = asyncio.run(scenario())
    state = timeline[-1][1] or {}
    report = {k: results.count(k) for k in sorted(set(results))}
    down = [t for t, s in timeline if s is None or "error" in s]
    print(f"\nEPLB actor killed: {len(results)} requests during the scenario: {report}; status showed it down for "
          f"{len(down)} polls; back (restarted, loop alive) after {back_at} s; first decision after restart at "
          f"{decided_at} s: rebalances={state.get('rebalances')} skipped_no_gain={state.get('skipped_no_gain')} "
          f"cycles={state.get('cycles')} window_steps={state.get('window_steps')}; scenario {total_s:.0f} s")  # fmt: skip
    assert results and report == {"ok": len(results)}, report  # serving never noticed
    assert back_at is not None, timeline[-3:]
    assert decided_at is not None, state
    assert state["cycles"] > 0 and state["window_steps"] >= 0
    full = ray.get(_eplb_actor(ray, url).get_state.remote())
    assert any(e["event"] == "resumed" for e in full["history"]), full["history"]
    # The resumed actor planned from what the ranks hold: both ranks agree with its placement.
    ranks = app_rank_actors(app_status(url))
    # Between its cycles (phase "collecting", the same rebalance count before and after reading the
    # ranks) the actor's placement is the one both ranks hold; while a plan is in flight they may not.
    # A plan in flight commits only while the group steps: keep one small request going meanwhile.
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, full["phase"]
        asyncio.run(_one_request(url))
        full = ray.get(_eplb_actor(ray, url).get_state.remote())
        held = ray.get([a.eplb_call.remote("eplb_placement") for a in ranks])
        after = ray.get(_eplb_actor(ray, url).get_state.remote())
        if full["phase"] == after["phase"] == "collecting" and full["rebalances"] == after["rebalances"]:
            break
        time.sleep(0.5)
    assert held[0] == held[1] == full["placement"]


def _drain(timeout_s: float) -> dict[str, Any]:
    from ray import serve

    return serve.get_app_handle(APP).drain.remote(timeout_s).result(timeout_s=timeout_s + 30)


def test_drain_lets_streams_finish_and_refuses_new(served):
    """Observed through both HTTP entry points: Serve's proxy and the ingress replica's own port."""
    from ray import serve

    urls = (served["url"], served["direct_url"])
    n, max_tokens = 6, 96
    # Direct ingress is really on: the replica answers on its own port.
    assert httpx.get(f"{urls[1]}/health", timeout=30).status_code == 200

    async def scenario() -> tuple[list[str], dict, list[str], list[int], float]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            started = [asyncio.Event() for _ in range(n)]
            streams = [asyncio.create_task(_request(client, urls[i % 2], i, max_tokens, True, started[i]))
                       for i in range(n)]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 60)  # all mid-stream
            t0 = time.monotonic()
            drain = asyncio.create_task(asyncio.to_thread(_drain, 60.0))
            await asyncio.sleep(0.5)
            late = await asyncio.gather(
                *[_request(client, urls[i % 2], 100 + i, 8, stream=i < 2) for i in range(4)]
            )
            health = [(await client.get(f"{u}/health")).status_code for u in urls]
            result = await drain
            drain_s = time.monotonic() - t0
            return await asyncio.gather(*streams), result, late, health, drain_s

    outcomes, result, late, health, drain_s = asyncio.run(scenario())
    print(f"\ndrain: {n} streams in flight ({max_tokens} tokens each, proxy and direct port): {outcomes}; "
          f"drain result {result}; {drain_s:.1f} s; requests sent while draining: {late}; /health {health}")  # fmt: skip
    assert outcomes == ["ok"] * n  # every in-flight stream got all its tokens
    assert result["drained"] and result["in_flight_left"] == 0 and result["in_flight_at_start"] >= n
    assert late == ["http_503"] * 4 and health == [503, 503]
    for url in urls:
        r = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10
        )
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["message"], url
    # Called off: admitting again.
    serve.get_app_handle(APP).resume.remote().result(timeout_s=30)
    for url in urls:
        r = httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200, url


def test_drain_timeout_bounds_the_wait(served):
    """A stream longer than the timeout does not hold the shutdown: drain returns after the timeout."""
    from ray import serve

    url = served["url"]

    async def scenario() -> tuple[str, dict, float]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            started = asyncio.Event()
            stream = asyncio.create_task(_request(client, url, 7, 400, True, started))
            await asyncio.wait_for(started.wait(), 60)
            t0 = time.monotonic()
            result = await asyncio.to_thread(_drain, 1.0)
            waited = time.monotonic() - t0
            await asyncio.to_thread(lambda: serve.get_app_handle(APP).resume.remote().result(timeout_s=30))
            return await stream, result, waited

    outcome, result, waited = asyncio.run(scenario())
    print(
        f"\ndrain with a 1 s timeout and a 400-token stream: {result}, returned after {waited:.1f} s; stream {outcome}"
    )
    assert not result["drained"] and result["in_flight_left"] == 1 and waited < 10
    assert outcome == "ok"  # draining does not cut it; only the shutdown after it would


def test_serve_delete_with_streams_in_flight(served, ray_local):
    """Serve's own drain (graceful_shutdown_timeout_s): streams finish, then the engines are stopped."""
    from ray import serve

    ray = ray_local
    url = served["url"]
    n, max_tokens = 4, 96

    async def scenario() -> tuple[list[str], list[str], float]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            started = [asyncio.Event() for _ in range(n)]
            streams = [asyncio.create_task(_request(client, url, i, max_tokens, True, started[i]))
                       for i in range(n)]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 60)
            t0 = time.monotonic()
            deleting = asyncio.create_task(asyncio.to_thread(serve.delete, APP))
            await asyncio.sleep(1.0)
            late = await asyncio.gather(*[_request(client, url, 100 + i, 8, stream=False) for i in range(3)])
            outcomes = await asyncio.gather(*streams)
            await asyncio.wait_for(deleting, 120)
            return outcomes, late, time.monotonic() - t0

    outcomes, late, delete_s = asyncio.run(scenario())
    print(
        f"\nserve.delete with {n} streams in flight: {outcomes}; sent during deletion: {late}; delete took {delete_s:.1f} s"
    )
    assert outcomes == ["ok"] * n
    assert all(x != "ok" and x != "hung" for x in late), late  # refused (404/503/connection), never queued
    deadline = time.monotonic() + 60
    while any(a["name"].startswith("dpserve_g") for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, ray.util.list_named_actors(all_namespaces=True)
        time.sleep(0.5)


@pytest.mark.timeout(420)
def test_sigterm_to_dpserve_serve_drains_then_shuts_down(served, ray_local, tmp_path: Path):
    """`dpserve serve` (serve run in that process) on this Ray; SIGTERM while streams are in flight."""
    from ray import serve

    ray = ray_local
    port = served["port"]  # the Serve instance (and its proxy) this module started
    if APP in serve.status().applications:  # run on its own: free the cores for the new app
        serve.delete(APP)
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "dpserve_sigterm", "route_prefix": "/", "import_path": "deployments.app:build_app",
                                "args": _app_args(served["model"], serving={"drain_timeout_s": 60})}]}  # fmt: skip
    path = tmp_path / "serve-sigterm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    log = open(tmp_path / "dpserve-serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)],
                            cwd=Path(__file__).resolve().parents[2], env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = served["url"]
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "dpserve-serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "dpserve-serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        n, max_tokens = 4, 96

        async def scenario() -> tuple[list[str], list[str], float, int]:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
                started = [asyncio.Event() for _ in range(n)]
                streams = [asyncio.create_task(_request(client, url, i, max_tokens, True, started[i]))
                           for i in range(n)]  # fmt: skip
                await asyncio.wait_for(asyncio.gather(*[e.wait() for e in started]), 60)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                late = await asyncio.gather(
                    *[_request(client, url, 100 + i, 8, stream=False) for i in range(3)]
                )
                outcomes = await asyncio.gather(*streams)
                code = await asyncio.to_thread(proc.wait, 120)
                return outcomes, late, time.monotonic() - t0, code

        outcomes, late, exit_s, code = asyncio.run(scenario())
        print(f"\nSIGTERM to dpserve serve with {n} streams in flight: {outcomes}; sent after SIGTERM: {late}; "
              f"process exited ({code}) {exit_s:.1f} s after the signal")  # fmt: skip
        assert outcomes == ["ok"] * n
        assert all(x != "ok" and x != "hung" for x in late), late
        assert "drained" in (tmp_path / "dpserve-serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    deadline = time.monotonic() + 60
    while any(a["name"].startswith("dpserve_g") for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.monotonic() < deadline, ray.util.list_named_actors(all_namespaces=True)
        time.sleep(0.5)


@pytest.mark.timeout(420)
def test_dpserve_shutdown_command_drains_then_ends_serve(served, ray_local):
    """`dpserve shutdown` (the command, in a subprocess on this Ray) against a running app while
    clients stream through the proxy and the direct port without pause: every stream the server
    accepted finishes with all its tokens, requests sent once it drains get 503 + Retry-After on
    both ports, the command reports the app drained and exits 0, and Serve (and the engines) end."""
    from ray import serve

    from deployments.app import build_app

    ray = ray_local
    urls = (served["url"], served["direct_url"])
    # The SIGTERM test ended the module's Serve: a new one, same options; one rank (starts faster).
    _start_serve(served["port"], served["env"])
    app = "dpserve_shutdown"
    args = _app_args(
        served["model"],
        {"data_parallel_size": 1, "enable_expert_parallel": False},
        serving={"drain_timeout_s": 60},
    )
    serve.run(build_app(args), name=app, route_prefix="/")
    assert httpx.get(f"{urls[1]}/health", timeout=30).status_code == 200

    async def scenario() -> tuple[list[list[str]], dict[str, tuple[int, str | None]], int, str, str]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:

            async def client_loop(c: int) -> list[str]:
                """Streams back to back until the server stops taking them."""
                outcomes: list[str] = []
                while not outcomes or outcomes[-1] == "ok":
                    outcomes.append(
                        await _request(client, urls[c % 2], 3000 + 100 * c + len(outcomes), 160, True)
                    )
                return outcomes

            loops = [asyncio.create_task(client_loop(c)) for c in range(4)]
            await asyncio.sleep(2.0)  # streams in flight on both ports
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cluster.cli", "shutdown", "--address",
                ray.get_runtime_context().gcs_address, "--timeout", "60",
                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            # Once the ingress drains (/health says so), a new request on each port: 503 + Retry-After.
            probes: dict[str, tuple[int, str | None]] = {}
            while proc.returncode is None and not probes:
                try:
                    health = await client.get(f"{urls[0]}/health", timeout=5)
                except httpx.HTTPError:
                    break  # already shut down: the probes below were missed (asserted)
                if health.status_code == 503 and health.json().get("status") == "draining":
                    for url in urls:
                        body = {"model": MODEL, "prompt": "late", "max_tokens": 4}
                        r = await client.post(f"{url}/v1/completions", json=body)
                        probes[url] = (r.status_code, r.headers.get("retry-after"))
                await asyncio.sleep(0.05)
            out, err = await asyncio.wait_for(proc.communicate(), 240)
            return await asyncio.gather(*loops), probes, proc.returncode, out.decode(), err.decode()

    outcomes, probes, code, out, err = asyncio.run(scenario())
    print(f"\ndpserve shutdown: exit {code}; client loops {outcomes}; probes while draining {probes}; {out}")
    output = out + err
    assert code == 0, output[-3000:]
    result = json.loads(out[out.index("{\n") :])  # the command prints its result as JSON
    assert result["apps"][app]["drained"] and result["apps"][app]["in_flight_at_start"] >= 1, result
    assert probes == {url: (503, "5") for url in urls}, (probes, output[-3000:])
    for loop in outcomes:
        # Every accepted stream completed; each loop ended on a refusal (503 while draining, or no
        # server once Serve is gone), never on a cut or hung stream.
        assert loop[:-1] == ["ok"] * (len(loop) - 1) and len(loop) >= 2, loop
        assert loop[-1] == "http_503" or loop[-1].startswith("connection_error"), loop
    # Serve ended: no controller, no engines, nothing listening on either port.
    deadline = time.monotonic() + 60
    while any(a["name"] == "SERVE_CONTROLLER_ACTOR" or a["name"].startswith("dpserve_g")
              for a in ray.util.list_named_actors(all_namespaces=True)):  # fmt: skip
        assert time.monotonic() < deadline, ray.util.list_named_actors(all_namespaces=True)
        time.sleep(0.5)
    for url in urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/health", timeout=5)
