"""The dpserve Serve application: an OpenAI-compatible ingress in front of N DP-rank actors.

`build_app(args)` is the builder `serve run` calls (see ray_configs/serve-*.yaml). The ingress
replica starts the rank actors (one placement-group bundle per rank), polls their stats, and sends
each new request to the least-loaded live rank.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import openai_protocol as oai
from deployments.engine_config import EngineSettings
from deployments.metrics import IngressMetrics
from deployments.rank import RequestRejected
from deployments.router import RankLoad, pick_rank

logger = logging.getLogger("dpserve.app")

STATS_POLL_S = 0.2
# Ranks with no request in flight are polled this often instead (each poll is a Ray call on both
# sides: at STATS_POLL_S an idle group's polls were most of the ingress's and the ranks' idle CPU).
IDLE_STATS_POLL_S = 1.0
# Ranks that miss this many consecutive stats polls are treated as dead (no new requests).
DEAD_AFTER_MISSED_POLLS = 10


@dataclass
class AppConfig:
    """Everything `build_app` accepts; engine settings plus serving options."""

    engine: EngineSettings = field(default_factory=EngineSettings)
    placement_strategy: str = "PACK"  # STRICT_SPREAD: one rank per node
    max_queued_per_rank: int | None = None  # admission bound; None: 4 x max_num_seqs
    rank_start_timeout_s: float = 900.0
    recovery_wait_s: float = 300.0  # how long a new request waits for a re-forming DP group
    # Streamed tokens are sent in chunks at most this often (0: every token on its own). Each chunk
    # is work on every hop (rank -> ingress, ingress -> client as an SSE event); per-token messages
    # cost more CPU than decoding the tiny model, and at DeepSeek scale tens of thousands of tokens/s
    # pass one ingress.
    stream_interval_ms: float = 50.0
    # How the ranks' output batches reach the ingress: "zmq" (a PUSH socket per rank to a PULL socket
    # bound on the ingress's node; needs a TCP port open from the ranks' nodes to the ingress's node,
    # like vLLM's DP ports) or "ray" (a Ray streaming call per rank; more CPU per step, no extra port).
    output_transport: str = "zmq"
    output_connect_timeout_s: float = 30.0  # then that rank's output goes through Ray instead
    ingress_num_cpus: float = 0.1
    # Graceful shutdown (`dpserve shutdown`, SIGTERM/Ctrl-C to `dpserve serve`): new API requests get
    # 503 + Retry-After, those in flight may finish for up to this long, then Serve is shut down.
    # Serve's own drain on `serve.delete`/redeploy is `graceful_shutdown_timeout_s` (ray_configs).
    drain_timeout_s: float = 30.0

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        args = dict(args or {})
        serving = {k: args.pop(k) for k in list(args) if k in ("placement_strategy", "max_queued_per_rank",
                                                                "rank_start_timeout_s", "recovery_wait_s", "stream_interval_ms",
                                                                "output_transport", "output_connect_timeout_s", "ingress_num_cpus",
                                                                "drain_timeout_s")}  # fmt: skip
        for ignored in ("http_host", "http_port"):  # set in the Serve config's http_options
            args.pop(ignored, None)
        return cls(engine=EngineSettings.from_dict(args), **serving)

    def __post_init__(self) -> None:
        if self.output_transport not in ("zmq", "ray"):
            raise ValueError(f"output_transport must be 'zmq' or 'ray', not {self.output_transport!r}")

    @property
    def queue_bound(self) -> int:
        return self.max_queued_per_rank or 4 * self.engine.max_num_seqs


app = FastAPI(title="dpserve", description="OpenAI-compatible API over data-parallel vLLM ranks")


class _Admission:
    """API requests in flight in this process (one ingress replica per process) and the drain flag.

    Class attributes, not a module-level instance: Serve pickles the ingress class by value (with
    copies of the globals it uses), while this class is pickled by reference, so both the ingress
    and the middleware reach this one object in the replica."""

    draining: bool = False
    in_flight: int = 0


class _AdmissionMiddleware:
    """Pure ASGI, so a streamed response counts as in flight until its last byte is sent. While the
    ingress drains, new API requests (POST /v1/...) are answered 503 + Retry-After at once."""

    def __init__(self, asgi_app: Any) -> None:
        self.app = asgi_app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope.get("type") != "http"
            or scope.get("method") != "POST"
            or "/v1/" not in scope.get("path", "")
        ):
            return await self.app(scope, receive, send)
        if _Admission.draining:
            response = _error("the server is shutting down; retry shortly", 503, headers={"Retry-After": "5"})
            return await response(scope, receive, send)
        _Admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _Admission.in_flight -= 1


app.add_middleware(_AdmissionMiddleware)


def _error(message: str, status: int, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(oai.error_body(message, status, param=param), status_code=status, headers=headers)


def _rejected(exc: RequestRejected) -> JSONResponse:
    # Raised on a rank, the exception arrives wrapped by Ray; its cause holds the clean message.
    cause = getattr(exc, "cause", None) or exc
    return _error(str(cause.args[0]) if cause.args else str(cause), getattr(cause, "status", 400),
                  getattr(cause, "param", None))  # fmt: skip


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error("request body is not valid JSON", 400)
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _error(f"{loc or 'body'}: {first.get('msg', 'invalid request')}", 422, param=loc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # e.g. a body that is not UTF-8 / cannot be parsed at all, an unknown route, a wrong method.
    return _error(str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None))


class OutputChannelUnreachable(ConnectionError):
    """A rank's ZMQ output channel did not connect to the ingress (e.g. a firewalled port)."""


def _cancel_ref(ref: Any) -> None:
    """Stop a rank's long-running call (best effort: the rank may already be gone)."""
    import ray

    if isinstance(ref, ray.ObjectRef):
        try:
            ray.cancel(ref)
        except Exception:
            pass


class Overloaded(Exception):
    pass


def _failure_message(exc: BaseException, where: str) -> str:
    """What a client is told when its request could not be finished (never a bare traceback)."""
    if isinstance(exc, LookupError):
        return f"no DP rank is available {where}: {exc.args[0] if exc.args else 'the DP group is being re-formed'}"
    return (
        f"the DP rank failed {where} ({type(exc).__name__}); the DP group is being re-formed, retry shortly"
    )


@serve.deployment(max_ongoing_requests=10_000, health_check_period_s=10, graceful_shutdown_timeout_s=30,
                  graceful_shutdown_wait_loop_s=1)  # fmt: skip
@serve.ingress(app)
class DPServer:
    async def __init__(self, config: dict[str, Any]):
        self.config = AppConfig.from_args(config)
        settings = self.config.engine
        settings.model = settings.resolve_model()  # build the tiny model once, before the ranks start
        self.model_name = settings.served_model_name
        n = settings.data_parallel_size
        self.actors: list[Any] = []
        self.pg = None
        self.generation = 0  # bumped each time the DP group is (re)formed
        self.recoveries = 0
        self.recovery_error: str | None = None  # why the last re-formation attempt failed
        self.stats: dict[int, dict[str, Any]] = {r: {} for r in range(n)}
        self.dispatched = {r: 0 for r in range(n)}
        self.served = {r: 0 for r in range(n)}
        self.missed = {r: 0 for r in range(n)}
        # When each rank's stats last arrived (with its output batches, or from a poll) and when its
        # gauges were last set: a rank that streams output is not polled as well.
        self._stats_at = {r: 0.0 for r in range(n)}
        self._gauges_at = {r: 0.0 for r in range(n)}
        self.live: set[int] = set()
        self._ready = asyncio.Event()
        # request id -> (rank, group generation, queue of its chunks), fed by one pump per rank
        self._inboxes: dict[str, tuple[int, int, asyncio.Queue]] = {}
        self._pumps: list[asyncio.Task] = []
        self._recovery: asyncio.Task | None = None
        self._metrics = IngressMetrics()
        await self._form_group()
        self._poller = asyncio.get_running_loop().create_task(self._poll_stats())

    # ---- the DP group ----------------------------------------------------------------------------
    async def _form_group(self) -> None:
        from deployments.rank_group import start_rank_group

        self.actors, self.pg, self.start_info = await start_rank_group(
            self.config.engine,
            self.config.placement_strategy,
            name_prefix=f"dpserve_g{self.generation + 1}_",  # operators can find a generation's ranks
            start_timeout_s=self.config.rank_start_timeout_s,
        )
        self.max_model_len = self.start_info[0]["max_model_len"]
        self.generation += 1
        for task in self._pumps:
            task.cancel()
        loop = asyncio.get_running_loop()
        self._pumps = [loop.create_task(self._pump(r, a, self.generation)) for r, a in enumerate(self.actors)]
        self.missed = {r: 0 for r in self.missed}
        self._stats_at = {r: 0.0 for r in self._stats_at}
        self.dispatched = {r: 0 for r in self.dispatched}  # old generation's requests are gone
        self.live = set(range(len(self.actors)))
        self._ready.set()

    async def _pump(self, rank: int, actor: Any, generation: int) -> None:
        """Move rank `rank`'s batched output into the requests' inboxes. If the rank's channel breaks,
        every request waiting on that rank gets the error (and the group is re-formed)."""
        try:
            if self.config.output_transport == "zmq":
                try:
                    await self._pump_zmq(rank, actor, generation)
                except OutputChannelUnreachable as exc:
                    logger.warning("%s; rank %d's output goes through Ray instead", exc, rank)
                else:
                    raise RuntimeError("the output channel ended")
            async for ref in actor.output_stream.options(num_returns="streaming").remote():
                self._deliver(rank, generation, *await ref)
            raise RuntimeError("the output channel ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if generation == self.generation:
                self._start_recovery(f"rank {rank}'s output channel broke ({type(exc).__name__})")
            for r, g, inbox in list(self._inboxes.values()):
                if r == rank and g == generation:
                    inbox.put_nowait(exc)

    def _deliver(self, rank: int, generation: int, batch: list, stats: dict[str, Any]) -> None:
        self._take_stats(rank, generation, stats)
        for request_id, chunk in batch:
            entry = self._inboxes.get(request_id)
            if entry is not None and entry[1] == generation:
                entry[2].put_nowait(chunk)

    async def _pump_zmq(self, rank: int, actor: Any, generation: int) -> None:
        """The rank pushes its batches to a PULL socket bound here (`DPRank.push_outputs`); the Ray
        call that does it stays open, and its failure (the rank died) ends the pump."""
        import msgspec
        import zmq
        import zmq.asyncio

        host = self._output_host(rank)
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port(f"tcp://{host}")
        decode = msgspec.msgpack.Decoder().decode
        pushing = actor.push_outputs.remote(f"tcp://{host}:{port}")

        def take(message: Any) -> None:
            try:
                batch, stats = decode(message)
                self._deliver(rank, generation, batch, stats)
            except (msgspec.DecodeError, ValueError, TypeError) as exc:  # not from a rank: drop it
                logger.warning("dropped a malformed message on rank %d's output channel: %s", rank, exc)

        async def receive() -> None:
            while True:
                take(await sock.recv(copy=False))

        first = asyncio.ensure_future(sock.recv(copy=False))
        watching = asyncio.ensure_future(pushing)
        receiving = None
        try:
            # The rank's first message (an empty batch) proves the channel; a firewalled port would
            # otherwise leave every request on this rank waiting forever.
            timeout = self.config.output_connect_timeout_s
            done, _ = await asyncio.wait(
                {first, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if first not in done:
                if watching in done:
                    watching.result()  # the rank's failure
                    raise RuntimeError("the rank's output channel ended")
                raise OutputChannelUnreachable(
                    f"rank {rank} did not reach this ingress at tcp://{host}:{port} within {timeout:.0f} s"
                )
            take(first.result())
            receiving = asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({receiving, watching}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the rank's failure (or a receive error)
        finally:
            for task in (first, receiving, watching):
                if task is not None:
                    task.cancel()
            _cancel_ref(pushing)
            ctx.destroy(linger=0)

    def _output_host(self, rank: int) -> str:
        """Where this ingress binds rank `rank`'s output socket: loopback when the rank runs on this
        node (nothing off the node can reach it), else this node's Ray address."""
        import ray

        if not ray.is_initialized():
            return "127.0.0.1"
        infos = getattr(self, "start_info", None) or []
        if rank < len(infos) and infos[rank].get("node_id") == ray.get_runtime_context().get_node_id():
            return "127.0.0.1"
        return ray.util.get_node_ip_address()

    def _start_recovery(self, reason: str) -> None:
        """Re-form the whole DP group: in lockstep MoE serving one lost rank breaks every rank's
        collectives (vLLM's engines on the other ranks die within seconds), so ranks are replaced
        together. New requests wait for the new group; requests in flight end with a clear error."""
        if self._recovery is not None and not self._recovery.done():
            return
        logger.error("DP group generation %d lost: %s; re-forming it", self.generation, reason)
        self._ready.clear()
        self.live = set()
        self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        from deployments.rank_group import stop_rank_group

        attempt = 0
        while True:
            attempt += 1
            try:
                await stop_rank_group(self.actors, self.pg, timeout_s=10)
            except Exception:
                logger.exception("stopping the old DP group failed; continuing")
            try:
                await self._form_group()
                self.recoveries += 1
                self.recovery_error = None
                logger.warning("DP group re-formed (generation %d, attempt %d)", self.generation, attempt)
                return
            except Exception as exc:
                self.recovery_error = f"attempt {attempt}: {type(exc).__name__}: {exc}"
                logger.exception("re-forming the DP group failed (attempt %d); retrying", attempt)
                await asyncio.sleep(min(30, 2**attempt))

    def _take_stats(self, rank: int, generation: int, stats: dict[str, Any]) -> None:
        """A rank's stats, from its output stream or a poll (the group's `generation` then)."""
        if generation != self.generation:
            return
        if stats.get("errored"):
            self._start_recovery(f"rank {rank}'s engine died")
            return
        now = time.monotonic()
        self.missed[rank] = 0
        self.stats[rank] = stats
        self._stats_at[rank] = now
        if now - self._gauges_at[rank] >= STATS_POLL_S:  # gauges at the poll rate, not per batch
            self._gauges_at[rank] = now
            self._metrics.rank_gauges(rank, stats)

    async def _poll_stats(self) -> None:
        """Poll the stats of ranks that sent none with their output lately: keeps the router's view
        fresh and notices a dead or hung rank. Busy ranks cost no extra Ray call; ranks with nothing
        in flight are polled every IDLE_STATS_POLL_S (a dead one is still seen at once: its output
        channel's call fails)."""
        import ray

        while True:
            if self._ready.is_set():
                actors, generation = list(self.actors), self.generation
                now = time.monotonic()
                due = [
                    r
                    for r in range(len(actors))
                    if now - self._stats_at[r] >= (STATS_POLL_S if self.dispatched[r] else IDLE_STATS_POLL_S)
                ]
                results = await asyncio.gather(
                    *[asyncio.wait_for(actors[r].get_stats.remote(), STATS_POLL_S * 5) for r in due],
                    return_exceptions=True,
                )
                for r, res in zip(due, results, strict=True):
                    if generation != self.generation:
                        break
                    if isinstance(res, ray.exceptions.RayActorError):
                        self._start_recovery(f"rank {r} actor died ({type(res).__name__})")
                    elif isinstance(res, BaseException):
                        self.missed[r] += 1
                        if self.missed[r] >= DEAD_AFTER_MISSED_POLLS:
                            self._start_recovery(f"rank {r} stopped answering for {self.missed[r]} polls")
                    else:
                        self._take_stats(r, generation, res)
            await asyncio.sleep(STATS_POLL_S)

    async def _wait_ready(self) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.config.recovery_wait_s)
            except TimeoutError:
                raise LookupError("the DP group is being re-formed") from None

    def _choose_rank(self) -> int:
        loads = {
            r: RankLoad(self.dispatched[r], self.stats[r].get("running", 0), self.stats[r].get("waiting", 0))
            for r in range(len(self.actors))
        }
        rank = pick_rank(loads, self.live)
        if self.dispatched[rank] >= self.config.queue_bound:
            raise Overloaded()
        return rank

    async def _stream(self, prompt: Any, sampling: dict[str, Any], messages: list | None,
                      request_id: str) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """Chunks from one rank. The first chunk (prompt_tokens) is awaited before anything is sent
        to the client, so a rejected request becomes an HTTP error rather than a broken stream.

        If the rank fails before producing a token, the request waits for the re-formed group and is
        retried once; after tokens were produced the failure is reported (no silent duplicates)."""
        produced = False
        for attempt in (1, 2):
            await self._wait_ready()
            rank = self._choose_rank()
            generation = self.generation
            self.dispatched[rank] += 1
            actor = self.actors[rank]
            inbox: asyncio.Queue = asyncio.Queue()
            self._inboxes[request_id] = (rank, generation, inbox)
            status = "error"
            try:
                first = await actor.submit.remote(
                    request_id, prompt, sampling, messages, self.config.stream_interval_ms
                )
                if attempt == 1:
                    yield first
                while True:
                    chunk = await inbox.get()
                    if isinstance(chunk, BaseException):
                        raise chunk
                    if "error" in chunk:
                        if chunk.get("status", 500) < 500:
                            raise RequestRejected(chunk["error"], chunk["status"], chunk.get("param"))
                        raise RuntimeError(chunk["error"])
                    produced = produced or bool(chunk.get("token_ids"))
                    yield chunk
                    if chunk.get("finish_reason"):
                        status = "ok"
                        return
            except (asyncio.CancelledError, GeneratorExit):
                status = "aborted"
                # Client went away: stop the rank's work for this request.
                try:
                    actor.abort.remote(request_id)
                except Exception:
                    pass
                raise
            except RequestRejected:
                status = "rejected"
                raise
            except Exception as exc:
                if generation == self.generation:
                    self._start_recovery(f"request {request_id} on rank {rank} failed: {type(exc).__name__}")
                if produced or attempt == 2:
                    raise
                logger.warning("request %s lost rank %d before its first token; retrying", request_id, rank)
                status = "retried"
            finally:
                self._inboxes.pop(request_id, None)
                if generation == self.generation:
                    self.dispatched[rank] -= 1
                self.served[rank] += 1
                self._metrics.request_done(rank, status)

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        ok = bool(self.live) and all(self.stats[r].get("ready") for r in self.live)
        body = {
            "status": "draining" if _Admission.draining else ("ok" if ok else "degraded"),
            "live_ranks": sorted(self.live),
            "ranks": len(self.actors),
        }
        return JSONResponse(body, status_code=200 if ok and not _Admission.draining else 503)

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
                    "max_model_len": self.max_model_len,
                }
            ],  # fmt: skip
        }

    async def _side_actor_states(self) -> dict[str, Any]:
        """The balance coordinator's and the EPLB actor's state (None where that part is off)."""
        import ray

        from deployments.rank_group import get_eplb_actor

        out: dict[str, Any] = {"balance": None, "eplb": None}
        calls = {}
        if self.config.engine.balance is not None:
            from scheduler.coordinator import DEFAULT_NAME, DEFAULT_NAMESPACE

            name = self.config.engine.balance.get("coordinator_name", DEFAULT_NAME)
            namespace = self.config.engine.balance.get("namespace", DEFAULT_NAMESPACE)
            try:
                calls["balance"] = ray.get_actor(name, namespace=namespace).get_stats.remote()
            except ValueError:
                out["balance"] = {"error": "coordinator not running"}
        controller = get_eplb_actor(self.actors)
        if controller is not None:
            calls["eplb"] = controller.get_state.remote()
        for key, ref in calls.items():
            try:
                state = await asyncio.wait_for(ref, 5)
                if key == "eplb":  # the full placement table is too big for a status line
                    state = {k: v for k, v in state.items() if k not in ("placement", "history")}
                out[key] = state
            except Exception as exc:
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        return out

    @app.get("/dpserve/status")
    async def status(self) -> dict[str, Any]:
        """Per-rank state for `dpserve status` and operators."""
        return (await self._side_actor_states()) | {
            "model": self.model_name,
            "data_parallel_size": len(self.actors),
            "expert_parallel": self.config.engine.enable_expert_parallel,
            "live_ranks": sorted(self.live),
            "group_generation": self.generation,
            "recovering": not self._ready.is_set(),
            "recoveries": self.recoveries,
            "recovery_error": self.recovery_error,
            "ranks": [
                dict(self.stats[r], dispatched=self.dispatched[r], served=self.served[r], live=r in self.live)
                for r in range(len(self.actors))
            ],  # fmt: skip
        }

    @app.post("/v1/completions")
    async def completions(self, body: oai.CompletionRequest):
        if (unknown := self._unknown_model(body.model)) is not None:
            return unknown
        try:
            prompt = body.single_prompt()
        except ValueError as exc:
            return _error(str(exc), 400, "prompt")
        return await self._respond(body, prompt, None, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: oai.ChatCompletionRequest):
        if (unknown := self._unknown_model(body.model)) is not None:
            return unknown
        try:
            messages = body.plain_messages()
        except ValueError as exc:
            return _error(str(exc), 400, "messages")
        return await self._respond(body, None, messages, body.limit(), chat=True)

    def _unknown_model(self, model: str) -> JSONResponse | None:
        if model == self.model_name:
            return None
        return _error(f"model {model!r} does not exist; this server serves {self.model_name!r}", 404, "model")

    async def _respond(self, body, prompt, messages, max_tokens: int | None, chat: bool):
        request_id = oai.new_id("chatcmpl" if chat else "cmpl")
        sampling = body.sampling(max_tokens)
        t0 = time.perf_counter()
        try:
            stream = self._stream(prompt, sampling, messages, request_id)
            first = await stream.__anext__()
        except Overloaded:
            return _error("all DP ranks are at their admission bound; retry shortly", 429,
                          headers={"Retry-After": "1"})  # fmt: skip
        except LookupError as exc:
            return _error(_failure_message(exc, "now"), 503, headers={"Retry-After": "5"})
        except RequestRejected as exc:
            return _rejected(exc)
        except Exception as exc:  # a rank died before anything was produced
            logger.exception("request %s failed before its first token", request_id)
            return _error(_failure_message(exc, "before the first token"), 503, headers={"Retry-After": "5"})
        prompt_tokens = first.get("prompt_tokens", 0)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._sse(stream, request_id, body.model, chat, prompt_tokens, include_usage, t0),
                media_type="text/event-stream",
            )
        text, completion_tokens, finish = [], 0, None
        try:
            async for chunk in stream:
                text.append(chunk.get("text", ""))
                completion_tokens += len(chunk.get("token_ids", []))
                finish = chunk.get("finish_reason") or finish
                if completion_tokens and len(text) == 1:
                    self._metrics.ttft(time.perf_counter() - t0)
        except RequestRejected as exc:
            return _rejected(exc)
        except Exception as exc:
            logger.exception("request %s failed", request_id)
            return _error(_failure_message(exc, "mid-request"), 503, headers={"Retry-After": "5"})
        content = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                      "logprobs": None}  # fmt: skip
            obj = "chat.completion"
        else:
            if body.echo and isinstance(prompt, str):
                content = prompt + content
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {
            "id": request_id,
            "object": obj,
            "created": oai.now(),
            "model": body.model,
            "choices": [choice],
            "usage": oai.usage(prompt_tokens, completion_tokens),
        }

    async def _sse(self, stream, request_id: str, model: str, chat: bool, prompt_tokens: int,
                   include_usage: bool, t0: float) -> AsyncIterator[str]:  # fmt: skip
        created = oai.now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion_tokens = 0
        first_token_at = None

        def event(choice: dict | None, usage: dict | None = None) -> str:
            payload = {"id": request_id, "object": obj, "created": created, "model": model,
                       "choices": [choice] if choice else []}  # fmt: skip
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield event(
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                )
            async for chunk in stream:
                n = len(chunk.get("token_ids", []))
                if n and first_token_at is None:
                    first_token_at = time.perf_counter()
                    self._metrics.ttft(first_token_at - t0)
                completion_tokens += n
                finish = chunk.get("finish_reason")
                text = chunk.get("text", "")
                if chat:
                    delta = {"content": text} if text else {}
                    yield event({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
                else:
                    yield event({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            if include_usage:
                yield event(None, oai.usage(prompt_tokens, completion_tokens))
            if first_token_at is not None and completion_tokens > 1:
                self._metrics.tpot((time.perf_counter() - first_token_at) / (completion_tokens - 1))
            yield "data: [DONE]\n\n"
        except RequestRejected as exc:
            yield f"data: {_rejected(exc).body.decode()}\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            logger.exception("stream %s failed", request_id)
            yield f"data: {json.dumps(oai.error_body(_failure_message(exc, 'mid-stream'), 503))}\n\n"

    async def drain(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Stop admitting API requests (503 + Retry-After) and wait until those in flight have sent
        their last byte, at most `timeout_s` (default `drain_timeout_s`). Called through a Serve
        handle by `dpserve shutdown` and `dpserve serve`'s SIGTERM/SIGINT handler before Serve is shut
        down (`serve.shutdown` alone kills the HTTP proxies at once, cutting streams)."""
        timeout = self.config.drain_timeout_s if timeout_s is None else float(timeout_s)
        _Admission.draining = True
        t0 = time.monotonic()
        at_start = _Admission.in_flight
        logger.warning("draining: %d API requests in flight, waiting up to %.0f s", at_start, timeout)
        while _Admission.in_flight and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.05)
        left = _Admission.in_flight
        waited = time.monotonic() - t0
        logger.warning("drained in %.2f s: %d requests left", waited, left)
        return {
            "drained": left == 0,
            "in_flight_at_start": at_start,
            "in_flight_left": left,
            "waited_s": waited,
        }

    async def resume(self) -> None:
        """Admit API requests again (undo `drain`, e.g. a shutdown that was called off)."""
        _Admission.draining = False

    async def __del__(self):
        # Serve calls this on shutdown/redeploy after its own drain (graceful_shutdown_timeout_s):
        # stop the engines so no engine process outlives us.
        from deployments.rank_group import stop_rank_group

        _Admission.draining = True
        if getattr(self, "_poller", None) is not None:
            self._poller.cancel()
        for task in getattr(self, "_pumps", []):
            task.cancel()
        if getattr(self, "actors", None):
            await stop_rank_group(self.actors, self.pg)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve builder: `serve run deployments.app:build_app` or `import_path` in a Serve config."""
    config = AppConfig.from_args(args)  # validate here: a bad config fails `serve run`, not a replica
    return DPServer.options(ray_actor_options={"num_cpus": config.ingress_num_cpus}).bind(dict(args or {}))
