"""Helpers shared by the test modules that run the tiny model on real engines (import as
`tests.helpers`; tests/conftest.py makes the repository root importable).

Equivalence tests compare greedy token ids of a fixed prompt set before and after a change (another
DP layout, an expert placement): the prompts, the greedy sampling and the round-robin generation
over rank actors live here once. Fault tests send OpenAI requests over HTTP and count how each one
ended (`request_completion`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx
import numpy as np
import psutil

PROMPTS = [
    "Hello world, the model",
    "What is a cluster of experts",
    "The quick brown fox jumps over",
    "Seven eight nine ten, the river",
    "Balance the gate on every rank",
    "Tokens are routed to experts",
    "North south east west",
    "Prefill and decode steps",
]


async def collect_stream(actor: Any, prompt: Any, sampling: dict[str, Any], request_id: str | None = None,
                         messages: list[dict] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one request on a rank actor to completion; returns text, token ids and finish reason."""
    text, token_ids, finish, prompt_tokens = [], [], None, 0
    async for ref in actor.generate.options(num_returns="streaming").remote(
        request_id, prompt, sampling, messages
    ):
        chunk = await ref
        prompt_tokens = chunk.get("prompt_tokens", prompt_tokens)
        text.append(chunk.get("text", ""))
        token_ids.extend(chunk.get("token_ids", []))
        finish = chunk.get("finish_reason") or finish
    return {
        "text": "".join(text),
        "token_ids": token_ids,
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
    }


def greedy(max_tokens: int) -> dict[str, Any]:
    """Greedy sampling of exactly `max_tokens` tokens (vLLM sampling params as a dict)."""
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


async def generate_on_ranks(
    actors: list[Any], prompts: list[str], sampling: dict[str, Any]
) -> list[list[int]]:
    """Token ids of `prompts`, sent concurrently to the rank actors round robin."""
    outs = await asyncio.gather(
        *[collect_stream(actors[i % len(actors)], p, sampling) for i, p in enumerate(prompts)]
    )
    return [o["token_ids"] for o in outs]


def random_placement(
    rng: np.random.Generator, layers: int, num_logical: int, num_redundant: int
) -> np.ndarray:
    """Per layer, every logical expert once plus `num_redundant` random replicas, in random slots."""
    return np.stack(
        [rng.permutation(np.concatenate([np.arange(num_logical), rng.integers(0, num_logical, num_redundant)]))
         for _ in range(layers)]
    )  # fmt: skip


TINY_MODEL_NAME = "dpserve-tiny-moe"


def tiny_app_args(tiny_model_dir: str, **sections: dict[str, Any] | None) -> dict[str, Any]:
    """dpserve app args for the tiny model on 2 DP ranks (tests/deployments/conftest.py serves them as
    `base_url`); each of `sections` updates the engine section or sets the balance/eplb/serving one."""
    args: dict[str, Any] = {
        "engine": {"model": tiny_model_dir, "served_model_name": TINY_MODEL_NAME, "data_parallel_size": 2,
                   "max_model_len": 512, "max_num_seqs": 8},
    }  # fmt: skip
    for name, section in sections.items():
        args[name] = None if section is None else (args.get(name) or {}) | section
    return args


def serve_app(app_args: dict[str, Any]) -> Iterator[str]:
    """Serve `app_args` as the app "dpserve" on a free loopback port; yields its URL. Serve is shut down
    afterwards (not just the app: a later serve.start() with its own port would otherwise be ignored
    and its requests sent to this port)."""
    from ray import serve

    from deployments.app import build_app
    from deployments.rank import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="dpserve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def app_status(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30) -> dict[str, Any]:
    """The app's ``/dpserve/status`` body (the group's generation, ranks, recovery state)."""
    return httpx.get(f"{url}/dpserve/status", headers=headers, timeout=timeout_s).json()


def app_rank_actors(status: dict[str, Any]) -> list[Any]:
    """The rank actors of the group that `status` (a `/dpserve/status` body) describes, by rank.

    By the names in the status, not by generation: apps of other test modules may still hold
    actors of the same generation while they shut down."""
    import ray

    from deployments.rank_group import RANK_NAMESPACE

    names = [r["actor_name"] for r in status["ranks"]]
    assert None not in names, names
    return [ray.get_actor(n, namespace=RANK_NAMESPACE) for n in names]


def engine_core_pid(rank_actor: Any) -> tuple[int, int]:
    """(the rank actor's pid, the pid of the engine-core process its vLLM client launched).

    From the client's process list, not from the process title: vLLM sets the title
    (VLLM::EngineCore_DP<r>) with setproctitle, which not every environment shows in /proc."""
    import ray

    def pids(self: Any) -> tuple[int, list[int]]:
        return os.getpid(), [p.pid for p in self.engine.engine_core.resources.engine_manager.processes]

    actor_pid, cores = ray.get(rank_actor.__ray_call__.remote(pids), timeout=60)
    children = [p.pid for p in psutil.Process(actor_pid).children(recursive=True)]
    assert len(cores) == 1 and cores[0] in children, (actor_pid, cores, children)
    return actor_pid, cores[0]


def rank_placement_group_id(rank_actor: Any) -> str:
    """The id (hex) of the placement group a rank actor runs in."""
    import ray

    def pg_id(self: Any) -> str:
        return ray.util.get_current_placement_group().id.hex()

    return ray.get(rank_actor.__ray_call__.remote(pg_id), timeout=60)


def process_gone(pid: int) -> bool:
    """True once the process has exited (a zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def request_completion(
    client: httpx.AsyncClient,
    url: str,
    i: int,
    max_tokens: int,
    stream: bool,
    started: asyncio.Event | None = None,
    *,
    api_key: str | None = None,
    prompt: str | None = None,
    errors: Literal["message", "status"] = "message",
    stream_usage: bool = True,
) -> str:
    """Send one completion (`ignore_eos`, the tiny model) to `url` and say how it ended.

    * ``"ok"``: exactly `max_tokens` tokens (a stream: and ``[DONE]``; with ``stream_usage=False`` the
      stream does not ask for usage and its token count is not checked), else ``"wrong_count"``;
    * ``"truncated"``: a stream that ended without ``[DONE]``;
    * ``"hung"``: an httpx timeout; ``"connection_error:<httpx exception class>"``: any other httpx error;
    * a refusal (HTTP status not 200) or an SSE error event, by `errors`:
      ``"message"``: ``"clear_error"`` if it carries an error message (OpenAI's body), else
      ``"unclear_error"``; the first error event ends the read;
      ``"status"``: ``"http_<status>"``, and ``"error_event"`` for a stream that carried an error event
      (read to its end first).

    `i` names the request (prompt ``"request {i} about experts"`` unless `prompt` is given); `started` is
    set at a stream's first chunk with choices; `api_key` is sent as a Bearer token.
    """
    if prompt is None:
        prompt = f"request {i} about experts"
    body: dict[str, Any] = {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                            "ignore_eos": True, "stream": stream}  # fmt: skip
    if stream_usage:
        body["stream_options"] = {"include_usage": True} if stream else None
    headers = None if api_key is None else {"Authorization": f"Bearer {api_key}"}
    try:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
            if r.status_code != 200:
                if errors == "status":
                    return f"http_{r.status_code}"
                return "clear_error" if r.json()["error"]["message"] else "unclear_error"
            return "ok" if r.json()["usage"]["completion_tokens"] == max_tokens else "wrong_count"
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raw = await r.aread()
                if errors == "status":
                    return f"http_{r.status_code}"
                return "clear_error" if json.loads(raw)["error"]["message"] else "unclear_error"
            done, tokens, error = False, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    if errors == "message":
                        return "clear_error" if event["error"].get("message") else "unclear_error"
                    error = True
                if event.get("choices") and started is not None:
                    started.set()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if error:
                return "error_event"
            if not done:
                return "truncated"
            return "ok" if not stream_usage or tokens == max_tokens else "wrong_count"
    except httpx.TimeoutException:
        return "hung"
    except httpx.HTTPError as exc:
        return f"connection_error:{type(exc).__name__}"


def wait_for(what: str, timeout_s: float, check: Callable[[], Any], poll_s: float = 0.5) -> Any:
    """Poll `check()` until it returns a true value (returned); fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(poll_s)
    return value


async def until(cond: Callable[[], Any], timeout_s: float = 30.0, poll_s: float = 0.001) -> None:
    """Yield to the event loop until `cond()` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s:g} s"
        await asyncio.sleep(poll_s)
