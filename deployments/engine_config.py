"""Engine settings shared by every DP rank, and their translation into vLLM engine arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from npu_runtime.platform import Platform, detect

DEFAULT_SERVED_NAME = "dpserve-tiny-moe"
# vLLM's uniprocess executor by name. vLLM's CPU platform turns "uni" into its multiprocess executor
# because its own server cannot give a worker its OpenMP environment any other way; a dpserve rank
# sets that environment itself (Platform.rank_env) before its engine-core process starts, so the
# model runs there, as on a GPU with TP=1: no worker process that the engine core busy-polls, no
# per-step pickling across processes (benchmarks/results/serving.md: variant `mp_executor`).
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
# Balance settings the engine-side scheduler reads (scheduler.balance_scheduler.BalanceConfig);
# the rest (policy, params, timeout_s) configures the coordinator actor.
BALANCE_CLIENT_KEYS = (
    "transport",
    "coordinator_name",
    "namespace",
    "ray_address",
    "lead",
    "wait_ms",
    "horizon",
    "dead_after_s",
)


@dataclass
class EngineSettings:
    """What a user sets for the model; the platform fills what they leave out.

    `model=None` means the tiny MoE model dpserve builds locally (reused when present).
    """

    model: str | None = None
    served_model_name: str = DEFAULT_SERVED_NAME
    data_parallel_size: int = 2
    enable_expert_parallel: bool = False
    tensor_parallel_size: int = 1
    max_model_len: int = 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    dtype: str | None = None  # None: the platform default (float32 on CPU)
    enforce_eager: bool | None = None  # None: the platform default (eager on CPU)
    seed: int = 0
    cpu_binding: str = "shared"  # CPU only: "shared" (every rank on every core) or "split" (cores divided)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # any other vLLM engine argument
    # Balance scheduling (DP prefill gate), e.g. {"policy": "any_at_cap"}; None: off (plain vLLM).
    # Keys: policy, params, timeout_s (coordinator) and the scheduler's BALANCE_CLIENT_KEYS.
    balance: dict[str, Any] | None = None
    # Online EPLB, e.g. {"enabled": True, "policy": "swift", "num_redundant": 4, "window_steps": 1000,
    # "interval_s": 5.0, "threshold": 0.95}; None: off. Read by eplb.actor and the ranks' worker extension.
    eplb: dict[str, Any] | None = None
    # vLLM's own engine metrics (TTFT/TPOT/ITL histograms, KV-cache usage, preemptions, ...) in the
    # Ray dashboard, through Ray's metrics. Off by default: recording them costs each rank CPU on
    # every engine step (benchmarks/results/serving.md); dpserve's own metrics are always on.
    engine_metrics: bool = False
    # Niceness of each rank's engine-core process; None (the default): what it inherits. Ray starts
    # its workers (the rank actors, the ingress, Serve's controller and proxy) at nice 15 and the
    # engines inherit it, below Ray's own daemons at 0; at 0 the engines step ahead of that control
    # plane, which then runs in the gaps of the lockstep (output throughput ahead in 5 of 7
    # side-by-side rounds on 2 cores, median +3 %, benchmarks/results/serving.md). Not the default
    # yet: with 0, tests/eplb/test_eplb_e2e.py's EPLB set-up timed out in the full CI suite twice
    # (one rank's gloo group never joined), a timing race that needs understanding first. Lowering
    # niceness needs root or CAP_SYS_NICE: without it the engine keeps Ray's value and warns.
    engine_nice: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EngineSettings:
        data = dict(data or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown engine setting(s) {unknown}; put raw vLLM arguments under engine_kwargs"
            )
        settings = cls(**data)
        settings.validate()
        return settings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError("data_parallel_size must be >= 1")
        if self.max_num_seqs < 1 or self.max_model_len < 16:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 16")
        if self.engine_nice is not None and not -20 <= self.engine_nice <= 19:
            raise ValueError(f"engine_nice must be in -20..19 or null, not {self.engine_nice!r}")
        if self.cpu_binding not in ("shared", "split"):
            raise ValueError(f"cpu_binding must be 'shared' or 'split', not {self.cpu_binding!r}")

    def resolve_model(self) -> str:
        if self.model:
            return self.model
        from npu_runtime.tiny_model import build_tiny_moe

        return str(build_tiny_moe())

    def engine_args(
        self,
        rank: int,
        dp_address: str,
        dp_rpc_port: int,
        platform: Platform | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for `AsyncEngineArgs` of DP rank `rank` (external load balancing: one
        engine per rank, ranks joined through `dp_address:dp_rpc_port`)."""
        platform = platform or detect()
        args: dict[str, Any] = dict(platform.engine_defaults)
        args.update(
            model=self.resolve_model(),
            served_model_name=self.served_model_name,
            tensor_parallel_size=self.tensor_parallel_size,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            enable_expert_parallel=self.enable_expert_parallel,
        )
        # Inside a Ray actor vLLM would pick its Ray executor (unsupported on CPU, and a second
        # layer of actors elsewhere); a one-device rank runs its worker in the engine-core process.
        if self.tensor_parallel_size == 1:
            args["distributed_executor_backend"] = UNIPROC_EXECUTOR if platform.name == "cpu" else "uni"
        if self.dtype is not None:
            args["dtype"] = self.dtype
        if self.enforce_eager is not None:
            args["enforce_eager"] = self.enforce_eager
        if self.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.data_parallel_size > 1:
            args.update(
                data_parallel_size=self.data_parallel_size,
                data_parallel_rank=rank,
                data_parallel_size_local=1,
                data_parallel_address=dp_address,
                data_parallel_rpc_port=dp_rpc_port,
            )
        args.update(self.engine_kwargs)
        if self.eplb is not None and self.eplb.get("enabled", True):
            # The worker extension (load recorder, slots, plan application) reached by collective_rpc.
            args.setdefault("worker_extension_cls", "eplb.applier.EplbWorkerExtension")
        if self.balance is not None:
            # After engine_kwargs: it merges (not replaces) a user's own additional_config.
            args.update(self.balance_engine_args(args))
        return args

    def balance_engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """`scheduler_cls` + `additional_config` that turn on dpserve's balance scheduler."""
        # Strings, not imports: the scheduler module imports vLLM, which only the engine needs.
        # Unset async_scheduling is for vLLM to decide (on where the platform allows it, e.g. CUDA; off
        # on CPU), known only once the engine builds its config: BalanceAutoScheduler follows it.
        use_async = self.engine_kwargs.get("async_scheduling", args.get("async_scheduling"))
        scheduler_cls = "scheduler.balance_scheduler." + (
            "BalanceAutoScheduler" if use_async is None else
            "BalanceAsyncScheduler" if use_async else "BalanceScheduler"
        )  # fmt: skip
        client = {k: v for k, v in (self.balance or {}).items() if k in BALANCE_CLIENT_KEYS}
        additional = dict(self.engine_kwargs.get("additional_config") or {})
        additional["dpserve_balance"] = client
        return {"scheduler_cls": scheduler_cls, "additional_config": additional}
