"""The dpserve Serve application: an OpenAI-compatible ingress in front of N DP-rank actors.

`build_app(args)` is the builder `serve run` calls (see ray_configs/serve-*.yaml); `args` is a
`DPServeConfig` (deployments/config.py). The ingress replica forms the rank group
(`RankGroupSupervisor`: one placement-group bundle per rank), receives the ranks' output through
`OutputChannel`, and sends each new request to the least-loaded live rank.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import openai_protocol as oai
from deployments.admission import Admission, AdmissionMiddleware
from deployments.api_key import ApiKey, ApiKeyMiddleware, resolve_api_key
from deployments.body_limit import BodyLimitMiddleware
from deployments.config import DPServeConfig
from deployments.group_supervisor import Overloaded, RankGroupSupervisor
from deployments.metrics import IngressMetrics
from deployments.request_errors import RankFailure, RequestError, from_reply
from deployments.responses import completion_body, error, failure_message, rejected, sse_events

logger = logging.getLogger("dpserve.app")

app = FastAPI(title="dpserve", description="OpenAI-compatible API over data-parallel vLLM ranks")
app.add_middleware(BodyLimitMiddleware)  # innermost: counts the body as the route reads it
app.add_middleware(AdmissionMiddleware)
app.add_middleware(ApiKeyMiddleware)  # outermost: a request without the key is not even counted


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error("request body is not valid JSON", 400)
    # 400 as OpenAI and vLLM answer (not FastAPI's 422), naming the first offending field.
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return error(f"{loc or 'body'}: {first.get('msg', 'invalid request')}", 400, param=loc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # e.g. a body that is not UTF-8 / cannot be parsed at all, an unknown route, a wrong method.
    return error(str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None))


def is_rank_failure(exc: BaseException) -> bool:
    """Whether `exc`, met by a request, means its rank is lost: the rank said so (RankFailure, also for
    a broken output channel) or Ray did (the actor died or cannot be reached)."""
    import ray

    return isinstance(exc, (RankFailure, ray.exceptions.RayActorError))


@serve.deployment(max_ongoing_requests=10_000, health_check_period_s=10, graceful_shutdown_timeout_s=30,
                  graceful_shutdown_wait_loop_s=1)  # fmt: skip
@serve.ingress(app)
class DPServer:
    async def __init__(self, config: DPServeConfig | dict[str, Any]):
        self.config = DPServeConfig.from_args(config)
        BodyLimitMiddleware.max_bytes = self.config.serving.max_body_bytes
        configured = self.config.serving.api_key
        ApiKey.key = resolve_api_key(configured.get_secret_value() if configured else None)
        # Build the tiny model once, before the ranks start.
        self.config.engine.model = self.config.engine.resolve_model()
        self.model_name = self.config.engine.served_model_name
        self.metrics = IngressMetrics()
        self.group = RankGroupSupervisor(self.config, self.metrics)
        await self.group.start()

    async def _stream(self, prompt: Any, sampling: dict[str, Any], messages: list | None,
                      request_id: str) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Chunks from one rank. The first chunk (prompt_tokens) is awaited before anything is sent
        to the client, so a rejected request becomes an HTTP error rather than a broken stream.

        A request's own error (RequestError, from the rank's reply or an error chunk) ends this
        request only. A lost rank (its actor, engine or output channel) re-forms the group: if that
        happens before a token, the request waits for the new group and is retried once; after
        tokens were produced the failure is reported (no silent duplicates)."""
        group = self.group
        produced = False
        sent_first = False
        for attempt in (1, 2):
            await group.wait_ready()
            rank = group.choose_rank()
            generation = group.generation
            group.dispatched[rank] += 1
            actor = group.actors[rank]
            inbox = group.channel.open(request_id, rank, generation)
            status = "error"
            try:
                first = await self._submit(group, rank, generation, actor, inbox, request_id, prompt, sampling,
                                           messages)  # fmt: skip
                if "error" in first:
                    raise from_reply(first)
                if not sent_first:  # the caller reads prompt_tokens from it, whichever attempt made it
                    sent_first = True
                    yield first
                while True:
                    chunk = await inbox.get()
                    if isinstance(chunk, BaseException):  # the rank's output channel broke
                        raise RankFailure(f"rank {rank}'s output channel broke") from chunk
                    if "error" in chunk:
                        raise from_reply(chunk)
                    produced = produced or bool(chunk.get("token_ids"))
                    yield chunk
                    if chunk.get("finish_reason"):
                        status = "ok"
                        return
            except (asyncio.CancelledError, GeneratorExit):
                status = "aborted"
                # Client went away: stop the rank's work for this request.
                group.channel.abort(rank, generation, request_id)
                raise
            except RequestError:
                status = "rejected"
                raise
            except Exception as exc:
                if not is_rank_failure(exc):
                    # Neither the request's nor the rank's known error (e.g. a failed Ray call to a
                    # live actor): this request ends with it; the stats poll and the output channel
                    # still notice a lost rank on their own.
                    logger.exception("request %s failed on rank %d", request_id, rank)
                    raise RequestError(f"the request failed on its rank ({type(exc).__name__})", 500) from exc
                if generation == group.generation:
                    group.start_recovery(
                        f"request {request_id} on rank {rank} failed: {type(exc).__name__}: {exc}"
                    )
                if produced or attempt == 2:
                    raise
                logger.warning("request %s lost rank %d before its first token; retrying", request_id, rank)
                status = "retried"
            finally:
                group.channel.close(request_id)
                if generation == group.generation:
                    group.dispatched[rank] -= 1
                group.served[rank] += 1
                self.metrics.request_done(rank, status)

    async def _submit(self, group: RankGroupSupervisor, rank: int, generation: int, actor: Any,
                      inbox: asyncio.Queue, request_id: str, prompt: Any, sampling: dict[str, Any],
                      messages: list | None) -> dict:  # fmt: skip
        """Start the request on `rank`; its reply: `prompt_tokens`, or an error reply. Over the request
        channel when the rank has one (the reply is the first chunk in `inbox`), else a Ray call."""
        serving = self.config.serving
        if not group.channel.submit(rank, request_id, prompt, sampling, messages, serving.stream_interval_ms):
            return await actor.submit.remote(
                request_id, prompt, sampling, messages, serving.stream_interval_ms
            )
        try:
            first = await asyncio.wait_for(inbox.get(), serving.submit_ack_timeout_s)
        except TimeoutError:
            group.channel.abort(rank, generation, request_id)
            raise RequestError(f"DP rank {rank} did not take the request within serving.submit_ack_timeout_s "
                               f"({serving.submit_ack_timeout_s:g} s); retry it", 503) from None  # fmt: skip
        if isinstance(first, BaseException):  # the rank's output channel broke
            raise RankFailure(f"rank {rank}'s output channel broke") from first
        return first

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        ok = self.group.is_healthy()
        body = {
            "status": "draining" if Admission.draining else ("ok" if ok else "degraded"),
            "live_ranks": sorted(self.group.live),
            "ranks": len(self.group.actors),
        }
        return JSONResponse(body, status_code=200 if ok and not Admission.draining else 503)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": oai.now(),
                    "owned_by": "dpserve",
                    "max_model_len": self.group.max_model_len,
                }
            ],  # fmt: skip
        }

    @app.get("/dpserve/status")
    async def status(self) -> dict[str, Any]:
        """Per-rank state for `dpserve status` and operators."""
        group = self.group
        return (await group.side_actor_states()) | {
            "model": self.model_name,
            "data_parallel_size": len(group.actors),
            "expert_parallel": self.config.engine.enable_expert_parallel,
            "live_ranks": sorted(group.live),
            "group_generation": group.generation,
            "recovering": not group.ready.is_set(),
            "recoveries": group.recoveries,
            "recovery_error": group.recovery_error,
            "hung_ranks_detected": group.hangs,
            "output_channel": group.channel.stats(),
            "ranks": group.rank_states(),
        }

    @app.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest):
        if (unknown := self._unknown_model(body.model)) is not None:
            return unknown
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            return error(str(exc), 400, "prompt")
        return await self._respond(body, prompt, None, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: oai.ChatCompletionRequest):
        if (unknown := self._unknown_model(body.model)) is not None:
            return unknown
        try:
            messages = body.plain_messages()
        except ValueError as exc:
            return error(str(exc), 400, "messages")
        return await self._respond(body, None, messages, body.limit(), chat=True)

    def _unknown_model(self, model: str) -> JSONResponse | None:
        if model == self.model_name:
            return None
        return error(f"model {model!r} does not exist; this server serves {self.model_name!r}", 404, "model")

    async def _respond(self, body, prompt, messages, max_tokens: int | None, chat: bool):
        try:
            body.check(self.group.max_model_len, self.config.serving.max_prompt_chars)
        except RequestError as exc:
            return rejected(exc)
        request_id = oai.new_id("chatcmpl" if chat else "cmpl")
        sampling = body.sampling(max_tokens)
        t0 = time.perf_counter()
        try:
            stream = self._stream(prompt, sampling, messages, request_id)
            first = await stream.__anext__()
        except Overloaded:
            return error("all DP ranks are at their admission bound; retry shortly", 429,
                         headers={"Retry-After": "1"})  # fmt: skip
        except LookupError as exc:
            return error(failure_message(exc, "now"), 503, headers={"Retry-After": "5"})
        except RequestError as exc:
            return rejected(exc)
        except Exception as exc:  # a rank died before anything was produced
            logger.exception("request %s failed before its first token", request_id)
            return error(failure_message(exc, "before the first token"), 503, headers={"Retry-After": "5"})
        prompt_tokens = first.get("prompt_tokens", 0)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse_events(
                    stream, request_id, body.model, chat, prompt_tokens, include_usage, self.metrics, t0
                ),
                media_type="text/event-stream",
            )
        return await completion_body(stream, request_id, body, prompt, chat, prompt_tokens, self.metrics, t0)

    async def check_health(self) -> None:
        """Serve's health check (every `health_check_period_s`): raising marks this replica unhealthy
        and Serve replaces it (its destructor stops the rank group, the new replica forms a new
        one). Only for what will not heal by itself: a re-formation stuck past
        `serving.max_recovery_s`, or a dead supervisor task."""
        if (problem := self.group.health_problem()) is not None:
            logger.error("ingress unhealthy: %s", problem)
            raise RuntimeError(problem)

    # ---- shutdown --------------------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Stop admitting API requests (503 + Retry-After) and wait until those in flight have sent
        their last byte, at most `timeout_s` (default `serving.drain_timeout_s`). Called through a
        Serve handle by `dpserve shutdown` and `dpserve serve`'s SIGTERM/SIGINT handler before Serve
        is shut down (`serve.shutdown` alone kills the HTTP proxies at once, cutting streams)."""
        timeout = self.config.serving.drain_timeout_s if timeout_s is None else float(timeout_s)
        return await Admission.drain(timeout)

    async def resume(self) -> None:
        """Admit API requests again (undo `drain`, e.g. a shutdown that was called off)."""
        Admission.draining = False

    async def __del__(self):
        # Serve calls this on shutdown/redeploy after its own drain (graceful_shutdown_timeout_s):
        # stop the engines so no engine process outlives us. A replica whose constructor failed has
        # no group.
        Admission.draining = True
        group = self.__dict__.get("group")
        if group is not None:
            await group.stop()


def build_app(args: DPServeConfig | dict[str, Any] | None = None) -> serve.Application:
    """Serve builder: `serve run deployments.app:build_app` or `import_path` in a Serve config."""
    config = DPServeConfig.from_args(args)  # validated here: a bad config fails `serve run`, not a replica
    return DPServer.options(ray_actor_options={"num_cpus": config.serving.ingress_num_cpus}).bind(config)
