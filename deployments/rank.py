"""One data-parallel rank: a vLLM engine configured as rank r of N, hosted by a Ray actor.

`DPRank` is a plain class (the tests and the CLI can use it in-process); `DPRankActor` is the same
class as a Ray actor. All N ranks must be started together: vLLM's DP handshake makes rank 0's
engine wait for every other rank's engine, and all ranks then step in lockstep through vLLM's DP
machinery (an idle rank runs dummy batches while another rank has work).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from deployments.engine_config import EngineSettings
from npu_runtime.platform import Platform, detect

logger = logging.getLogger("dpserve.rank")


class RequestRejected(ValueError):
    """The request is invalid for this model (maps to an HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class RankStats:
    rank: int
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    step: int = 0
    updated: float = 0.0  # time.monotonic() of the last engine stats update
    in_flight: int = 0  # requests this rank's frontend holds (admitted, not yet finished)
    ready: bool = False
    errored: bool = False  # the engine died (e.g. a peer rank's collectives broke)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray: tests, the CLI)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _make_stats_logger_factory(stats: RankStats):
    """A vLLM stat-logger factory that mirrors the engine's scheduler stats into `stats`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _RankStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            stats.running = scheduler_stats.num_running_reqs
            stats.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            stats.step += 1  # one record() per engine step that produced outputs
            stats.updated = time.monotonic()

        def log_engine_initialized(self):
            pass

    return _RankStatsLogger


def _vllm_metrics_logger(enabled: bool):
    """The aggregate logger that fills vLLM's own engine metrics (TTFT/TPOT histograms, KV-cache
    usage, ...). Enabled: vLLM's Ray logger, so they reach the Ray dashboard / Prometheus like
    dpserve's own metrics. Disabled: a logger that records nothing. Either way it takes the place of
    the prometheus_client logger vLLM would add by default, which nobody scrapes inside a Ray actor
    and which costs the rank CPU on every engine step."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    if enabled:
        return RayPrometheusStatLogger

    class _NoEngineMetrics(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
            self.engine_indexes = engine_indexes or [0]  # no metric objects: nothing registered

        def record(self, *args, **kwargs) -> None:
            pass

        def record_sleep_state(self, *args, **kwargs) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _NoEngineMetrics


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
        from npu_runtime.platform import by_name

        self.settings = (
            settings if isinstance(settings, EngineSettings) else EngineSettings.from_dict(settings)
        )
        self.rank = rank
        self.platform: Platform = by_name(platform_name) if platform_name else detect()
        # Ranks sharing this host (all of them when the caller gave no slot: one host).
        self.ranks_on_host = host_slot[1] if host_slot else self.settings.data_parallel_size
        if cpu_cores is None and host_slot is not None and self.platform.name == "cpu":
            from cluster.placement import cpu_cores_for_rank

            cpu_cores = cpu_cores_for_rank(*host_slot, binding=self.settings.cpu_binding)
        self.cpu_cores = cpu_cores
        self.stats = RankStats(rank=rank)
        self.engine = None
        self.tokenizer = None
        self._vllm_config = None
        # Multiplexed output: every request's chunks go into one outbox that the ingress drains
        # through one channel (`push_outputs`: one message per batch, not per request and token).
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task] = {}
        # The rank's environment must be in place before vLLM is imported in this process.
        # The rank's own placement (cores, devices) always wins; user-set defaults are kept.
        placement_keys = {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", self.platform.visible_devices_env}
        rank_env = self.platform.rank_env(rank, self._device_ids(), cpu_cores, self._omp_threads(cpu_cores))
        for key, value in rank_env.items():
            if key in placement_keys:
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)
        if self.settings.engine_nice is not None:  # read by npu_runtime.vllm_plugin in the engine core
            from npu_runtime.vllm_plugin import ENGINE_NICE_ENV

            os.environ.setdefault(ENGINE_NICE_ENV, str(self.settings.engine_nice))
        self.network_env = self._resolve_network_env()

    def _resolve_network_env(self) -> dict[str, str]:
        """Point vLLM (VLLM_HOST_IP) and gloo/tensorpipe/HCCL (*_SOCKET_IFNAME, HCCL_IF_IP) at this
        Ray node's own address and the NIC holding it; returns what is in effect.

        Only inside Ray (outside, the platform's loopback defaults stay). An operator's value is kept
        unless it points at loopback while the node does not (the CPU platform default, or a node
        env copied from a one-host setup): advertised across hosts, loopback makes the DP handshake
        or the first gloo collective hang."""
        from npu_runtime.platform import host_network_env, is_loopback_value

        try:
            import ray

            if not ray.is_initialized():
                return {}
            node_ip = ray.util.get_node_ip_address()
        except Exception:
            return {}
        node_is_loopback = is_loopback_value("VLLM_HOST_IP", node_ip)
        for key, value in host_network_env(self.platform, node_ip).items():
            current = os.environ.get(key)
            if current is None or (is_loopback_value(key, current) and not node_is_loopback):
                if current is not None and current != value:
                    logger.warning("rank %d: %s=%s is loopback on node %s; using %s", self.rank, key,
                                   current, node_ip, value)  # fmt: skip
                os.environ[key] = value
        keys = ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_IF_IP", "HCCL_SOCKET_IFNAME")
        return {k: os.environ[k] for k in keys if k in os.environ}

    def _omp_threads(self, cpu_cores: list[int] | None) -> int | None:
        """OpenMP threads for this rank's model on CPU with `shared` binding: its share of the cores
        the ranks on its host share (more threads than cores make OpenMP's barriers spin against
        each other). None otherwise: `rank_env`'s default, one thread per core the rank owns."""
        if not cpu_cores or self.settings.cpu_binding != "shared":
            return None
        return max(1, len(cpu_cores) // max(1, self.ranks_on_host))

    def _device_ids(self) -> list[int] | None:
        if not self.platform.visible_devices_env:
            return None
        try:
            import ray

            ids = ray.get_runtime_context().get_accelerator_ids().get(self.platform.ray_resource, [])
            return [int(i) for i in ids] or None
        except Exception:
            return None

    # ---- lifecycle -------------------------------------------------------------------------------
    def node_ip(self) -> str:
        """Address other ranks use to reach this rank (rank 0 hosts the DP handshake)."""
        ip = os.environ.get("VLLM_HOST_IP")
        if ip:
            return ip
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:
            return "127.0.0.1"

    def reserve_dp_endpoint(self) -> tuple[str, int]:
        ip = self.node_ip()
        return ip, free_port(ip)

    def network_info(self) -> dict[str, str]:
        """This rank's resolved network identity (VLLM_HOST_IP, *_SOCKET_IFNAME, ...) for checks
        and operators."""
        return dict(self.network_env) | {"node_ip": self.node_ip()}

    async def start(self, dp_address: str, dp_rpc_port: int) -> dict[str, Any]:
        """Build the engine; returns when every DP rank has joined (vLLM's DP handshake)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        kwargs = self.settings.engine_args(self.rank, dp_address, dp_rpc_port, self.platform)
        engine_args = AsyncEngineArgs(**kwargs)
        self.engine = AsyncLLM.from_engine_args(
            engine_args,
            stat_loggers=[
                _make_stats_logger_factory(self.stats),
                _vllm_metrics_logger(self.settings.engine_metrics),
            ],
        )
        self.tokenizer = self.engine.get_tokenizer()
        self._vllm_config = self.engine.vllm_config
        self.stats.ready = True
        startup = time.perf_counter() - t0
        logger.info("DP rank %d ready in %.1f s", self.rank, startup)
        return {"rank": self.rank, "startup_s": startup, "max_model_len": self.max_model_len(),
                "node_id": _ray_node_id()}  # fmt: skip

    def max_model_len(self) -> int:
        return int(self._vllm_config.model_config.max_model_len) if self._vllm_config else 0

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            self.stats.ready = False
        outcome_dir = getattr(self, "_eplb_outcome_dir", None)
        if outcome_dir:  # the EPLB plan records the worker wrote for this rank (eplb_outcome_local)
            import shutil

            shutil.rmtree(outcome_dir, ignore_errors=True)
            self._eplb_outcome_dir = None

    # ---- requests --------------------------------------------------------------------------------
    def _prompt_token_ids(self, prompt: str | list[int] | None, messages: list[dict] | None) -> list[int]:
        if messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # malformed roles/contents the template cannot render
                raise RequestRejected(f"cannot apply the chat template: {exc}", param="messages") from None
            # The template already holds the special tokens it needs.
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise RequestRejected(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        raise RequestRejected("prompt must be a string or a list of token ids", param="prompt")

    def _sampling_params(self, params: dict[str, Any], prompt_len: int):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        limit = self.max_model_len()
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", param="prompt")
        if prompt_len >= limit:
            raise RequestRejected(
                f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len}",
                param="prompt",
            )
        params = dict(params)
        max_tokens = params.pop("max_tokens", None)
        room = limit - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise RequestRejected(
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the maximum "
                f"context length {limit}",
                param="max_tokens",
            )
        try:
            return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **params)
        except (TypeError, ValueError) as exc:
            raise RequestRejected(str(exc)) from None

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
        request_id, ids, params = self._prepare(request_id, prompt, sampling, messages)
        yield {"prompt_tokens": len(ids), "rank": self.rank}
        chunks = self._chunks(request_id, ids, params, stream_interval_ms)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # at once, so a consumer that leaves frees the engine's slot now

    def _prepare(self, request_id, prompt, sampling, messages):
        if self.engine is None:
            raise RuntimeError(f"DP rank {self.rank} is not started")
        ids = self._prompt_token_ids(prompt, messages)
        return request_id or uuid.uuid4().hex, ids, self._sampling_params(sampling or {}, len(ids))

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
        `prompt_tokens` (or raises RequestRejected for a request this model cannot take)."""
        request_id, ids, params = self._prepare(request_id, prompt, sampling, messages)
        self._tasks[request_id] = asyncio.get_running_loop().create_task(
            self._run_to_outbox(request_id, ids, params, stream_interval_ms)
        )
        return {"prompt_tokens": len(ids), "rank": self.rank}

    async def _run_to_outbox(
        self, request_id: str, ids: list[int], params, stream_interval_ms: float
    ) -> None:
        try:
            finished = False
            async for chunk in self._chunks(request_id, ids, params, stream_interval_ms):
                self._outbox.put_nowait((request_id, chunk))
                finished = chunk["finish_reason"] is not None
            if not finished:  # the engine ended the stream without a final output: say so
                self._outbox.put_nowait((request_id, {"text": "", "token_ids": [], "finish_reason": "abort"}))
        except asyncio.CancelledError:
            pass  # aborted by the ingress: _chunks freed the engine's slot
        except RequestRejected as exc:
            self._outbox.put_nowait(
                (request_id, {"error": str(exc), "status": exc.status, "param": exc.param})
            )
        except Exception as exc:
            logger.exception("request %s failed on rank %d", request_id, self.rank)
            self._outbox.put_nowait((request_id, {"error": f"{type(exc).__name__}: {exc}", "status": 503}))
        finally:
            self._tasks.pop(request_id, None)

    async def _next_batch(self) -> list[tuple[str, dict[str, Any]]]:
        """All chunks ready now (at least one): typically one engine step's worth for all running
        requests."""
        batch = [await self._outbox.get()]
        while not self._outbox.empty():
            batch.append(self._outbox.get_nowait())
        return batch

    async def output_stream(
        self,
    ) -> AsyncIterator[tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]]:
        """Every submitted request's chunks, batched, as a Ray stream: each item is one batch and the
        rank's stats (`get_stats`) as of then, so a busy rank needs no separate stats call. One
        consumer (the ingress with `output_transport: ray`; `push_outputs` is the default path)."""
        while True:
            yield await self._next_batch(), self.get_stats()

    async def push_outputs(self, address: str) -> None:
        """The same batches and stats as `output_stream`, msgpack-encoded and pushed over ZMQ to the
        ingress's PULL socket at `address` (``tcp://host:port``). Runs until cancelled; the ingress
        holds this call's ref, which fails when the rank dies.

        Why not a Ray stream: each streamed item costs a serialisation in an executor thread plus
        core-worker RPCs on both sides, about half the rank actor's and much of the ingress's CPU at
        one item per engine step (py-spy, benchmarks/results/serving.md). A ZMQ message is one
        syscall; vLLM moves the same outputs from its engine core the same way."""
        import msgspec
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        # Sends wait for a completed connection instead of queueing: if the ingress cannot be reached
        # no chunk is taken from the outbox, and the ingress's fallback (`output_stream`) gets them.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(address)
        encode = msgspec.msgpack.Encoder().encode
        try:
            # An empty batch first: tells the ingress the channel works.
            await sock.send(encode(([], self.get_stats())), copy=False)
            while True:
                batch = await self._next_batch()
                await sock.send(encode((batch, self.get_stats())), copy=False)
        finally:
            ctx.destroy(linger=0)

    async def _engine_outputs(self, ids: list[int], params, request_id: str):
        """vLLM's output stream; its input validation errors become RequestRejected (HTTP 400)."""
        from vllm.v1.engine.exceptions import EngineGenerateError

        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                yield out
        except EngineGenerateError as exc:
            if isinstance(exc.__cause__, (ValueError, TypeError)):
                raise RequestRejected(str(exc.__cause__)) from None
            raise

    async def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # its cleanup aborts the request in the engine
        elif self.engine is not None:
            await self.engine.abort(request_id)

    def get_stats(self) -> dict[str, Any]:
        self.stats.errored = self.engine is not None and self.engine.errored
        return self.stats.as_dict()

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

    # ---- EPLB (online expert load balancing; see eplb/applier.py) --------------------------------
    async def eplb_call(self, method: str, *args: Any) -> Any:
        """Run worker-extension method `method` (eplb.applier.EplbWorkerExtension) in this rank's
        worker; returns its result (one worker per rank: TP=1)."""
        if self.engine is None:
            raise RuntimeError(f"DP rank {self.rank} is not started")
        results = await self.engine.collective_rpc(method, args=args)
        return results[0]

    async def eplb_setup(self) -> dict[str, Any]:
        """Install physical slots and tables (every rank together, while idle) and a LoadWindow."""
        import tempfile

        from eplb.load import LoadWindow

        cfg = dict(self.settings.eplb or {})
        # Plan records also land in a per-rank file the worker (in the engine core, our child on this
        # host) writes: pollers read it here instead of calling into the engine (eplb_outcome_local).
        outcome_dir = os.path.join(tempfile.gettempdir(), f"dpserve-eplb-{os.getpid()}-r{self.rank}")
        status = await self.eplb_call("eplb_setup", int(cfg.get("num_redundant", 0)),
                                      int(cfg.get("layers_per_step", 1)), outcome_dir)  # fmt: skip
        self._eplb_outcome_dir = status.get("outcome_dir")
        self._eplb_misses: dict[int, float] = {}  # plan id -> since when no file
        placement = await self.eplb_call("eplb_placement")
        self._eplb_window = LoadWindow(
            len(placement), status["num_logical"], int(cfg.get("window_samples", 8))
        )
        self._eplb_steps = 0
        return status

    async def eplb_collect(self) -> dict[str, Any]:
        """Drain the worker's counts into this rank's LoadWindow (one sample per call); returns
        {"load": float [layers, E] window total, "steps": engine steps in the window so far,
        "samples", "complete", "record_us_per_call"}."""
        import numpy as np

        taken = await self.eplb_call("eplb_take_load")
        self._eplb_window.add(np.asarray(taken["counts"], dtype=np.int64))
        self._eplb_steps += int(taken["steps"])
        return {
            "rank": self.rank,
            "load": self._eplb_window.total().tolist(),
            "steps": self._eplb_steps,
            "samples": self._eplb_window.steps_recorded,
            "complete": self._eplb_window.is_complete(),
            "record_us_per_call": taken["record_us_per_call"],
        }

    async def eplb_outcome_local(self, plan_id: int, wait_s: float = 0.0) -> dict[str, Any] | None:
        """Plan `plan_id`'s record (as the worker's `eplb_outcome`), None while it is pending, read from
        the file the worker writes when the plan ends: no call into the engine, whose stepping thread
        runs every call between steps. With `wait_s`, waits up to that long for the file here (checked
        every 50 ms in this actor), so a poller needs one call per plan instead of one per interval.
        Asks the engine instead when the worker writes no files, and every 2 s without a file (a write
        that failed: the plan's end is still reported); raises when the engine is gone, as the engine
        call would."""
        import json

        d = getattr(self, "_eplb_outcome_dir", None)
        pid = int(plan_id)
        t_end = time.monotonic() + max(0.0, float(wait_s))
        while True:
            if self.engine is None or self.engine.errored:
                raise RuntimeError(f"DP rank {self.rank} engine is not running")
            if not d:
                return await self.eplb_call("eplb_outcome", pid)
            try:
                with open(os.path.join(d, f"plan-{pid}.json")) as f:
                    rec = json.load(f)
                self._eplb_misses.pop(pid, None)
                return rec
            except FileNotFoundError:
                pass
            for k in [k for k in self._eplb_misses if k < pid - 20]:
                del self._eplb_misses[k]
            t_miss = self._eplb_misses.setdefault(pid, time.monotonic())
            if time.monotonic() - t_miss >= 2.0:  # no file for 2 s: ask the engine once, then again 2 s on
                self._eplb_misses[pid] = time.monotonic()
                rec = await self.eplb_call("eplb_outcome", pid)
                if rec is not None:
                    return rec
            if time.monotonic() >= t_end:
                return None
            await asyncio.sleep(min(0.05, max(0.0, t_end - time.monotonic())))

    def eplb_reset_window(self) -> None:
        """Forget the window (after a committed rebalance: the next plan sees the new regime)."""
        self._eplb_window.reset()
        self._eplb_steps = 0
