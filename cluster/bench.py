"""A serving benchmark client for OpenAI-compatible servers (dpserve, vLLM's own server, ...).

Random prompts of a fixed input length (sent as token ids, so every server sees exactly the same
input) and a fixed output length (ignore_eos), streamed, with optional concurrency cap and request
rate. Reports TTFT / TPOT / ITL (mean, p50, p90, p99) and request/token throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class Workload:
    num_prompts: int = 64
    input_len: int = 64
    output_len: int = 64
    max_concurrency: int | None = 16
    request_rate: float = float("inf")  # requests per second (Poisson arrivals); inf: all at once
    vocab_low: int = 10  # token ids drawn from [vocab_low, vocab_high): avoids special tokens
    vocab_high: int = 2000
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [[rng.randrange(self.vocab_low, self.vocab_high) for _ in range(self.input_len)]
                for _ in range(self.num_prompts)]  # fmt: skip


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {"mean": statistics.fmean(s), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int
) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    last = start
    res = RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - start
        res.ok = res.output_tokens == output_len
        if not res.ok:
            res.error = f"got {res.output_tokens} tokens, wanted {output_len}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_workload(url: str, model: str, workload: Workload, progress: bool = True) -> dict[str, Any]:
    """Run the workload against `url` and return the summary (a JSON-able dict)."""
    prompts = workload.prompts()
    sem = asyncio.Semaphore(workload.max_concurrency or len(prompts))
    rng = random.Random(workload.seed + 1)
    done = 0

    # The API key the server requires, if any: the same variable the server reads (deployments/api_key.py).
    key = os.environ.get("DPSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=1000), headers=headers
    ) as client:

        async def limited(p: list[int]) -> RequestResult:
            nonlocal done
            async with sem:
                r = await _one(client, url, model, p, workload.output_len)
            done += 1
            if progress and (done % max(1, len(prompts) // 10) == 0 or done == len(prompts)):
                print(f"  {done}/{len(prompts)} requests done", flush=True)
            return r

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if workload.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(workload.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "workload": asdict(workload) | {"request_rate": str(workload.request_rate)},
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_token_throughput": len(ok) * workload.input_len / duration,
        "output_token_throughput": out_tokens / duration,
        "ttft_ms": {k: v * 1000 for k, v in _pcts([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1000 for k, v in _pcts(tpots).items()},
        "itl_ms": {k: v * 1000 for k, v in _pcts([x for r in ok for x in r.itl]).items()},
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    return (
        f"{name}: {s['completed']} ok / {s['failed']} failed in {s['duration_s']:.1f} s | "
        f"out {s['output_token_throughput']:.1f} tok/s | req {s['request_throughput']:.2f}/s | "
        f"TTFT mean {s['ttft_ms']['mean']:.0f} p99 {s['ttft_ms']['p99']:.0f} ms | "
        f"TPOT mean {s['tpot_ms']['mean']:.1f} ms | ITL p50 {s['itl_ms']['p50']:.1f} p99 {s['itl_ms']['p99']:.1f} ms"
    )
