"""One data-parallel rank: a vLLM engine configured as rank r of N, hosted by a Ray actor.

`DPRank` is a plain class (the tests and the CLI can use it in-process); `DPRankActor` is the same
class as a Ray actor. All N ranks must be started together: vLLM's DP handshake makes rank 0's
engine wait for every other rank's engine, and all ranks then step in lockstep through vLLM's DP
machinery (an idle rank runs dummy batches while another rank has work).

Its parts: `RankEnvironment` (cores, devices, network identity; set before vLLM is imported),
`RankOutbox` (every request's chunks, batched for the ingress), `RankEplb` (the rank's side of
online EPLB), and `rank_requests` (tokenization and sampling parameters).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deployments.config import EngineSettings
from deployments.metrics import FrameDrops
from deployments.rank_env import RankEnvironment, actor_name, free_port, node_ip, ray_node_id
from deployments.rank_eplb import RankEplb
from deployments.rank_outbox import RankOutbox
from deployments.rank_requests import prompt_token_ids, sampling_params
from deployments.rank_stats import RankStats, stats_logger_factory, vllm_metrics_logger
from deployments.request_channel import RequestReceiver
from deployments.request_errors import RankFailure, RequestError, RequestRejected, classify, error_reply
from npu_runtime import vllm_patches
from npu_runtime.platform import Platform, by_name, detect

__all__ = ["DPRank", "RequestRejected", "free_port"]

logger = logging.getLogger("dpserve.rank")

# How many aborts of requests not (yet) held are remembered (a few seconds of aborts at any rate).
EARLY_ABORTS_KEPT = 4096


class DPRank:
    """A vLLM `AsyncLLM` engine acting as data-parallel rank `rank` of `settings.data_parallel_size`."""

    def __init__(
        self,
        settings: dict[str, Any] | EngineSettings,
        rank: int,
        cpu_cores: list[int] | None = None,
        platform_name: str | None = None,
        host_slot: tuple[int, int] | None = None,
    ):
        """`cpu_cores`: the cores this rank's engine may use on CPU (None: no binding), or else
        `host_slot` = (this rank's index among the ranks on its host, how many there are), from
        which the rank picks its cores on its own host (`cpu_binding`)."""
        self.settings = EngineSettings.model_validate(settings)
        self.rank = rank
        self.platform: Platform = by_name(platform_name) if platform_name else detect()
        self.env = RankEnvironment(self.settings, rank, self.platform, cpu_cores, host_slot)
        self.stats = RankStats(rank=rank)
        self.engine: Any = None  # vLLM AsyncLLM once started
        self.tokenizer: Any = None
        self._max_model_len = 0
        self.outbox = RankOutbox(rank, self.get_stats)
        # Tokenizing and rendering chat templates run here, off the actor's event loop: a long prompt
        # would otherwise stall the rank's output pushes and stats answers (and look like a dead rank).
        # One thread: requests are tokenized in arrival order, and a fast tokenizer is not shared
        # between threads.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dpserve-tokenize-{rank}")
        self.eplb = RankEplb(rank, self.settings.eplb, self.eplb_call, self._engine_running)
        self.requests: RequestReceiver | None = None  # the ingress's request channel, once opened
        # Aborts for requests this rank did not hold yet: a submit and its abort may travel different
        # paths (the request socket, a Ray call), so the abort can come first; the submit is then
        # dropped. Bounded: the oldest ids go first.
        self._aborted_early: OrderedDict[str, None] = OrderedDict()

    # ---- lifecycle -------------------------------------------------------------------------------
    def node_ip(self) -> str:
        """Address other ranks use to reach this rank (rank 0 hosts the DP handshake)."""
        return node_ip()

    def reserve_dp_endpoint(self) -> tuple[str, int]:
        ip = self.node_ip()
        return ip, free_port(ip)

    def network_info(self) -> dict[str, str]:
        """This rank's resolved network identity (VLLM_HOST_IP, *_SOCKET_IFNAME, ...) for checks
        and operators."""
        return dict(self.env.network_env) | {"node_ip": self.node_ip()}

    async def start(self, dp_address: str, dp_rpc_port: int) -> dict[str, Any]:
        """Build the engine; returns when every DP rank has joined (vLLM's DP handshake)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        kwargs = self.settings.engine_args(self.rank, dp_address, dp_rpc_port, self.platform)
        # A feature whose vLLM patches do not fit this vLLM refuses here, before any engine process.
        vllm_patches.require_for_engine(kwargs, self.platform.name)
        self.stats.vllm_patches = vllm_patches.summary()
        if self.platform.name == "npu":
            from npu_runtime import ascend_patches

            self.stats.vllm_patches += f"; {ascend_patches.summary()}"
            kwargs = self._ascend_engine_args(kwargs)
        engine_args = AsyncEngineArgs(**kwargs)
        self.engine = AsyncLLM.from_engine_args(
            engine_args,
            stat_loggers=[
                stats_logger_factory(self.stats),
                vllm_metrics_logger(self.settings.engine_metrics),
            ],
        )
        self.tokenizer = self.engine.get_tokenizer()
        self._max_model_len = int(self.engine.vllm_config.model_config.max_model_len)
        self.stats.ready = True
        startup = time.perf_counter() - t0
        logger.info("DP rank %d ready in %.1f s", self.rank, startup)
        return {"rank": self.rank, "startup_s": startup, "max_model_len": self.max_model_len(),
                "node_id": ray_node_id(), "pid": os.getpid(), "actor_name": actor_name()}  # fmt: skip

    def _ascend_engine_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """On Ascend: refuse features whose vllm-ascend symbols do not fit (npu_runtime.ascend_patches);
        with EPLB on, the start-up expert map vllm-ascend allocates the redundant slots from, written
        on this rank's node (eplb.ascend.startup)."""
        from npu_runtime import ascend_patches

        ascend_patches.require_for_engine(kwargs)
        if not self.settings.eplb_enabled:
            return kwargs
        from eplb.ascend.startup import with_startup_slots

        path = os.path.join(tempfile.gettempdir(), f"dpserve-expert-map-{os.getpid()}-r{self.rank}.json")
        return with_startup_slots(kwargs, self.settings.eplb.num_redundant, path)

    def max_model_len(self) -> int:
        return self._max_model_len

    def shutdown(self) -> None:
        if self.requests is not None:
            self.requests.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            self.stats.ready = False
        self.eplb.remove_outcome_files()  # the EPLB plan records the worker wrote for this rank

    def _engine_running(self) -> bool:
        return self.engine is not None and not self.engine.errored

    # ---- requests --------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str | None,
        prompt: str | list[int] | None = None,
        sampling: dict[str, Any] | None = None,
        messages: list[dict] | None = None,
        stream_interval_ms: float = 0.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's output as plain dicts: the first carries `prompt_tokens`, each later
        one the new text and token ids; the last has `finish_reason` set. (One Ray stream per
        request: simple, for tools and tests; the ingress uses `submit` + `push_outputs`.)"""
        chunks = self._request_chunks(request_id, prompt, sampling, messages, stream_interval_ms)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # at once, so a consumer that leaves frees the engine's slot now

    async def _prepare(self, request_id, prompt, sampling, messages):
        """Token ids and SamplingParams for one request. Whatever the tokenizer, the chat template or
        SamplingParams raise is that request's error (`classify`: RequestRejected, a 400), never the
        rank's."""
        if self.engine is None:
            raise RankFailure(f"DP rank {self.rank} is not started")
        try:
            ids = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, prompt_token_ids, self.tokenizer, prompt, messages
            )
            params = sampling_params(sampling or {}, len(ids), self.max_model_len())
        except Exception as exc:
            raise classify(exc, self._engine_running()) from None
        return request_id or uuid.uuid4().hex, ids, params

    async def _chunks(self, request_id: str, ids: list[int], params, stream_interval_ms: float):
        """The engine's output for one request, coalesced: with `stream_interval_ms` > 0, tokens after
        the first are sent at most that often (every chunk is a message on each hop to the client,
        and per-token messages cost more CPU than the tokens themselves on a busy host)."""
        interval = stream_interval_ms / 1000.0
        self.stats.in_flight += 1
        finished = False
        try:
            text: list[str] = []
            token_ids: list[int] = []
            last_sent = None
            async for out in self._engine_outputs(ids, params, request_id):
                comp = out.outputs[0]
                finished = out.finished
                text.append(comp.text)
                token_ids.extend(comp.token_ids)
                now = time.monotonic()
                if finished or last_sent is None or now - last_sent >= interval:
                    yield {
                        "text": "".join(text),
                        "token_ids": token_ids,
                        "finish_reason": comp.finish_reason if finished else None,
                    }
                    text, token_ids, last_sent = [], [], now
        finally:
            self.stats.in_flight -= 1
            if not finished and self.engine is not None:
                # The consumer went away (client disconnect) or failed: free the engine's slot.
                await self.engine.abort(request_id)

    async def submit(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        sampling: dict[str, Any] | None = None,
        messages: list[dict] | None = None,
        stream_interval_ms: float = 0.0,
    ) -> dict[str, Any]:
        """Start a request whose chunks go to `push_outputs` (or `output_stream`); returns
        `prompt_tokens`, or for a request that cannot start an error reply as plain data
        (`request_errors.error_reply`: the request's own error with its status, or `rank_failed`)."""
        if self._take_early_abort(request_id):
            return error_reply(RequestError("the request was aborted before it started", 499))
        try:
            request_id, ids, params = await self._prepare(request_id, prompt, sampling, messages)
        except (RequestError, RankFailure) as exc:
            return error_reply(exc)
        if self._take_early_abort(request_id):  # aborted while it was tokenized
            return error_reply(RequestError("the request was aborted before it started", 499))
        self.outbox.start(request_id, self._chunks(request_id, ids, params, stream_interval_ms))
        return {"prompt_tokens": len(ids), "rank": self.rank}

    def _submit_from_channel(self, request_id: str, prompt: Any, sampling: dict[str, Any],
                             messages: list | None, stream_interval_ms: float) -> None:  # fmt: skip
        # The whole request (tokenizing included) is one outbox task, so an abort that follows on
        # the channel finds it at any stage.
        if self._take_early_abort(request_id):
            return
        self.outbox.start(
            request_id, self._request_chunks(request_id, prompt, sampling, messages, stream_interval_ms)
        )

    async def _request_chunks(self, request_id, prompt, sampling, messages, stream_interval_ms):
        """One request from its prompt on: `prompt_tokens` (`submit`'s reply) as the first chunk,
        then its output."""
        request_id, ids, params = await self._prepare(request_id, prompt, sampling, messages)
        yield {"prompt_tokens": len(ids), "rank": self.rank}
        chunks = self._chunks(request_id, ids, params, stream_interval_ms)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def open_requests(self, local: bool, key: bytes, max_frame_bytes: int) -> str:
        """Bind this rank's request socket (deployments/request_channel.py) for frames sealed with
        the group's `key` and at most `max_frame_bytes` long, on loopback when the ingress runs on
        this node (`local`), else on this node's address; returns its address for the ingress."""
        if self.requests is not None:
            self.requests.close()
        self.requests = RequestReceiver(key, self._submit_from_channel, self._abort_now, max_frame_bytes,
                                        on_drop=FrameDrops("request"))  # fmt: skip
        return self.requests.bind("127.0.0.1" if local else self.node_ip())

    def _abort_now(self, request_id: str) -> None:
        if not self.outbox.cancel(request_id):
            self._remember_early_abort(request_id)

    def _remember_early_abort(self, request_id: str) -> None:
        self._aborted_early[request_id] = None
        while len(self._aborted_early) > EARLY_ABORTS_KEPT:
            self._aborted_early.popitem(last=False)

    def _take_early_abort(self, request_id: str | None) -> bool:
        """Whether `request_id` was aborted before it started (and forget that)."""
        if request_id is None or request_id not in self._aborted_early:
            return False
        del self._aborted_early[request_id]
        return True

    async def output_stream(
        self,
    ) -> AsyncIterator[tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]]:
        """Every submitted request's chunks, batched, as a Ray stream: each item is one batch and the
        rank's stats (`get_stats`) as of then, so a busy rank needs no separate stats call. One
        consumer (the ingress with `output_transport: ray`; `push_outputs` is the default path)."""
        async for item in self.outbox.stream():
            yield item

    async def push_outputs(self, address: str, key: bytes, max_frame_bytes: int) -> None:
        """The same batches and stats as `output_stream`, pushed over ZMQ to the ingress's PULL
        socket at `address` (``tcp://host:port``; `RankOutbox.push`), sealed with the group's frame
        `key`, in frames of at most `max_frame_bytes`. Runs until cancelled; the ingress holds this
        call's ref, which fails when the rank dies."""
        await self.outbox.push(address, key, max_frame_bytes)

    async def _engine_outputs(self, ids: list[int], params, request_id: str):
        """vLLM's output stream. An error it raises is the request's own (a RequestError: vLLM's
        validation, or a failure of this request while the engine keeps stepping) unless the engine
        is gone (RankFailure); `request_errors.classify` decides."""
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                yield out
        except Exception as exc:
            raise classify(exc, self._engine_running()) from exc

    async def abort(self, request_id: str) -> None:
        if not self.outbox.cancel(request_id):
            self._remember_early_abort(request_id)  # its submit may still be on the way
            if self.engine is not None:
                await self.engine.abort(request_id)  # a request from `generate`

    def get_stats(self) -> dict[str, Any]:
        self.stats.errored = self.engine is not None and self.engine.errored
        stats = self.stats.as_dict()
        if self.requests is not None and (self.requests.dropped or self.requests.lost):
            stats["request_channel"] = self.requests.stats()
        return stats

    async def balance_stats(self, trace_from: int | None = None) -> dict[str, Any] | None:
        """The balance scheduler's gate counters in this rank's engine core (``None`` without balance);
        with ``trace_from``, its per-step trace rows from that sequence number on
        (``scheduler/step_trace.py``)."""
        if self.engine is None:
            raise RuntimeError(f"DP rank {self.rank} is not started")
        try:
            return await self.engine.engine_core.call_utility_async("dpserve_balance_stats", trace_from)
        except Exception as e:  # no balance scheduler in this engine: the utility does not exist
            if "dpserve_balance_stats" in str(e):
                return None
            raise

    async def check_health(self) -> bool:
        if self.engine is None or self.engine.errored:
            return False
        await self.engine.check_health()
        return True

    async def ping(self) -> int:
        await asyncio.sleep(0)
        return self.rank

    # ---- EPLB (online expert load balancing; RankEplb, eplb/applier.py) -------------------------
    async def eplb_call(self, method: str, *args: Any) -> Any:
        """Run worker-extension method `method` (eplb.applier.EplbWorkerExtension) in this rank's
        worker; returns its result (one worker per rank: TP=1)."""
        if self.engine is None:
            raise RuntimeError(f"DP rank {self.rank} is not started")
        results = await self.engine.collective_rpc(method, args=args)
        return results[0]

    async def eplb_setup(self) -> dict[str, Any]:
        """Install physical slots and tables (every rank together, while idle) and a LoadWindow."""
        return await self.eplb.setup()

    async def eplb_collect(self) -> dict[str, Any]:
        """This rank's load window after one more sample (`RankEplb.collect`)."""
        return await self.eplb.collect()

    async def eplb_outcome_local(self, plan_id: int, wait_s: float = 0.0) -> dict[str, Any] | None:
        """Plan `plan_id`'s record, None while pending, from the worker's outcome file
        (`RankEplb.outcome_local`)."""
        return await self.eplb.outcome_local(plan_id, wait_s)

    def eplb_reset_window(self) -> None:
        """Forget the window (after a committed rebalance: the next plan sees the new regime)."""
        self.eplb.reset_window()
