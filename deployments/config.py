"""The dpserve application config: one typed model for a Serve config's `args`.

    args:
      engine:  {model, data_parallel_size, max_num_seqs, ..., engine_kwargs}   # every rank's engine
      balance: {policy, params, ...}      # DP prefill gate; absent or null: off (plain vLLM)
      eplb:    {policy, num_redundant, ...}   # online expert load balancing; absent or null: off
      serving: {stream_interval_ms, output_transport, drain_timeout_s, ...}   # the ingress

`DPServeConfig.from_args` validates it once, in the builder (a bad config fails `serve run`, not a
replica); unknown keys are errors that name the key. `EngineSettings` is what every rank of a group
is started from: the engine section plus the balance and eplb sections the engines need.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eplb.actor import DEFAULTS as EPLB_ACTOR_DEFAULTS
from npu_runtime.platform import Platform, by_name, detect
from scheduler.coordinator import DEFAULT_NAME as COORDINATOR_NAME
from scheduler.coordinator import DEFAULT_NAMESPACE as COORDINATOR_NAMESPACE
from scheduler.gate_report import MAX_HORIZON, MAX_LEAD

DEFAULT_SERVED_NAME = "dpserve-tiny-moe"
# vLLM's uniprocess executor by name. vLLM's CPU platform turns "uni" into its multiprocess executor
# because its own server cannot give a worker its OpenMP environment any other way; a dpserve rank
# sets that environment itself (Platform.rank_env) before its engine-core process starts, so the
# model runs there, as on a GPU with TP=1: no worker process that the engine core busy-polls, no
# per-step pickling across processes (benchmarks/results/serving.md: variant `mp_executor`).
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"
# vLLM engine arguments the rank group sets for each rank (DP size, rank, handshake address):
# `engine_kwargs` may not override them.
GROUP_OWNED_ENGINE_ARGS = frozenset(
    {
        "data_parallel_size",
        "data_parallel_rank",
        "data_parallel_start_rank",
        "data_parallel_size_local",
        "data_parallel_address",
        "data_parallel_rpc_port",
        "data_parallel_hybrid_lb",
        "data_parallel_external_lb",
        "data_parallel_multi_port_external_lb",
        "data_parallel_backend",
        "master_port",
        "node_rank",
    }
)


class ConfigError(ValueError):
    """An invalid dpserve config; the message names each offending key by its path."""


def _known(name: str, known: Any, what: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineSection(_Section):
    """What a user sets for the model; the platform fills what they leave out.

    `model=None` means the tiny MoE model dpserve builds locally (reused when present).
    """

    model: str | None = None
    served_model_name: str = DEFAULT_SERVED_NAME
    # What the ranks run on, and so what each rank's bundle asks for (an NPU, a GPU or a share of a
    # CPU) and the engine defaults. None (the default): chosen when the group starts, from the
    # cluster's Ray resources (any NPU: npu, else any GPU: cuda, else cpu) or DPSERVE_PLATFORM where
    # the ingress runs; never from the ingress's own node (npu_runtime.platform.choose_platform).
    platform: Literal["npu", "cuda", "cpu"] | None = None
    data_parallel_size: int = Field(2, ge=1)
    enable_expert_parallel: bool = False
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(1024, ge=16)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int | None = None
    dtype: str | None = None  # None: the platform default (float32 on CPU)
    enforce_eager: bool | None = None  # None: the platform default (eager on CPU)
    seed: int = 0
    # CPU only: "shared" (every rank on every core) or "split" (cores divided between the ranks).
    cpu_binding: Literal["shared", "split"] = "shared"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vLLM engine argument
    # vLLM's own engine metrics (TTFT/TPOT/ITL histograms, KV-cache usage, preemptions, ...) in the
    # Ray dashboard, through Ray's metrics. Off by default: recording them costs each rank CPU on
    # every engine step (benchmarks/results/serving.md); dpserve's own metrics are always on.
    engine_metrics: bool = False
    # Niceness of each rank's engine-core process; None (the default): what it inherits. Ray starts
    # its workers (the rank actors, the ingress, Serve's controller and proxy) at nice 15 and the
    # engines inherit it, below Ray's own daemons at 0; at 0 the engines step ahead of that control
    # plane, which then runs in the gaps of the lockstep (benchmarks/results/serving.md, variant
    # dpserve:default there, with 0). Not the default: side by side it gave 693 vs 680 output tok/s
    # (+1.9 %, 4 rounds) while the rounds themselves spread from 0.85 to 1.03 x vLLM, so the gain is
    # not shown. Lowering niceness needs root or CAP_SYS_NICE: without it the engine keeps Ray's
    # value and warns.
    engine_nice: int | None = Field(None, ge=-20, le=19)

    def resolved_platform(self) -> Platform:
        """`platform` when set, else this process's own (`detect()`: a rank in-process, a tool)."""
        return by_name(self.platform) if self.platform else detect()

    def resolve_model(self) -> str:
        """The model path: `model`, or the tiny MoE model (built on first use)."""
        if self.model:
            return self.model
        from npu_runtime.tiny_model import build_tiny_moe

        return str(build_tiny_moe())

    @field_validator("engine_kwargs")
    @classmethod
    def _group_owns_dp_args(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(kwargs) & GROUP_OWNED_ENGINE_ARGS)
        if owned:
            raise ValueError(
                f"engine_kwargs may not set {owned}: the rank group sets the DP size, rank and "
                "addresses (use engine.data_parallel_size for the DP size)"
            )
        return kwargs


class BalanceSection(_Section):
    """Balance scheduling: the DP prefill gate (scheduler/). `policy`, `params` and `timeout_s`
    configure the coordinator actor; the rest is what each engine's scheduler reads
    (scheduler.balance_scheduler.BalanceConfig; what is not set here is the scheduler's default)."""

    policy: str = "any_at_cap"
    params: dict[str, Any] | None = None
    timeout_s: float = 5.0
    coordinator_name: str = COORDINATOR_NAME
    namespace: str = COORDINATOR_NAMESPACE
    ray_address: str | None = None  # set when the group starts: the engines join Ray by GCS address
    transport: Literal["zmq", "ray", "none"] | None = None
    lead: int | None = Field(None, ge=1, le=MAX_LEAD)
    wait_ms: float | None = None
    horizon: int | None = Field(None, ge=1, le=MAX_HORIZON)
    dead_after_s: float | None = None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from scheduler.policy import POLICIES

        return _known(name, POLICIES, "gate policy")

    @field_validator("params")
    @classmethod
    def _policy_accepts_params(
        cls, params: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        # Built here so a misspelt or out-of-range parameter fails the config check, not the
        # coordinator when the group starts; make_policy's error names the parameter.
        from scheduler.policy import make_policy

        if "policy" in info.data:  # absent when the policy name itself is invalid
            make_policy(info.data["policy"], **(params or {}))
        return params

    def scheduler_config(self) -> dict[str, Any]:
        """The `additional_config["dpserve_balance"]` block each engine's scheduler reads."""
        coordinator_only = {"policy", "params", "timeout_s"}
        return self.model_dump(exclude=coordinator_only, exclude_unset=True, exclude_none=True)


class EplbSection(_Section):
    """Online expert load balancing (eplb/): the EPLB actor's planning cycle and each rank's
    worker-side slots and load window."""

    enabled: bool = True
    # The EPLB actor's settings; their defaults are the actor's own (eplb.actor.DEFAULTS).
    policy: str = EPLB_ACTOR_DEFAULTS["policy"]
    params: dict[str, Any] = Field(default_factory=lambda: dict(EPLB_ACTOR_DEFAULTS["params"]))
    num_redundant: int = Field(EPLB_ACTOR_DEFAULTS["num_redundant"], ge=0)  # slots beyond one per expert
    window_steps: int = Field(EPLB_ACTOR_DEFAULTS["window_steps"], ge=1)  # engine steps per load window
    # The first plan's window (null: window_steps); a short one lets the first plan land during the
    # start-up prefills (eplb.pacing.plan_due).
    first_window_steps: int | None = Field(EPLB_ACTOR_DEFAULTS["first_window_steps"], ge=1)
    interval_s: float = EPLB_ACTOR_DEFAULTS["interval_s"]  # between the actor's cycles
    threshold: float = EPLB_ACTOR_DEFAULTS["threshold"]  # commit below threshold x the current max load
    plan_timeout_s: float = EPLB_ACTOR_DEFAULTS["plan_timeout_s"]
    poll_interval_s: float = EPLB_ACTOR_DEFAULTS["poll_interval_s"]
    outcome_wait_s: float = EPLB_ACTOR_DEFAULTS["outcome_wait_s"]
    blocking: bool = EPLB_ACTOR_DEFAULTS["blocking"]  # stop-the-world application (for comparisons)
    # How the ranks stage each plan: overrides of eplb.messages.TRANSFER_DEFAULTS (e.g. fit_step).
    transfer: dict[str, Any] = Field(default_factory=lambda: dict(EPLB_ACTOR_DEFAULTS["transfer"]))
    # Each rank's side.
    window_samples: int = Field(8, ge=1)  # samples each rank's LoadWindow keeps
    layers_per_step: int = Field(1, ge=1)
    setup_on_start: bool = True  # install slots and tables when the group starts
    autostart: bool = True  # start the EPLB actor's cycles once it is initialised
    max_restarts: int = -1  # of the EPLB actor
    resume_retry_s: float = 2.0  # a restarted EPLB actor retries re-initialising this often

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from eplb.policies import POLICIES

        return _known(name, POLICIES, "EPLB policy")

    @field_validator("transfer")
    @classmethod
    def _known_transfer_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from eplb.messages import transfer_options
        from eplb.plan import PlanError

        try:
            transfer_options(options)
        except PlanError as exc:
            raise ValueError(f"EPLB {exc}") from None
        return options


class ServingSection(_Section):
    """The ingress: placement of the rank group, admission, streaming, recovery and drain."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_queued_per_rank: int | None = Field(None, ge=1)  # admission bound; None: 4 x max_num_seqs
    rank_start_timeout_s: float = 900.0
    recovery_wait_s: float = 300.0  # how long a new request waits for a re-forming DP group
    # Streamed tokens are sent in chunks at most this often; 0 (the default): every token as its own
    # SSE event, as vLLM's and OpenAI's servers stream (benchmarks/results/serving.md measures both
    # servers at that granularity). Each chunk is work on every hop (rank -> ingress, ingress ->
    # client); a busy ingress at DeepSeek scale (tens of thousands of tokens/s through one replica)
    # can trade latency granularity for CPU with e.g. 50.
    stream_interval_ms: float = Field(0.0, ge=0)
    # How the ranks' output batches reach the ingress: "zmq" (a PUSH socket per rank to a PULL socket
    # bound on the ingress's node; needs a TCP port open from the ranks' nodes to the ingress's node,
    # like vLLM's DP ports) or "ray" (a Ray streaming call per rank; more CPU per step, no extra port).
    output_transport: Literal["zmq", "ray"] = "zmq"
    output_connect_timeout_s: float = 30.0  # then that rank's output goes through Ray instead
    # With "zmq", new requests and aborts go to the ranks over the same channel (one frame each, not
    # a Ray call; deployments/request_channel.py). A request the rank has not acknowledged (tokenized
    # and queued) within this long gets a 503 and is aborted there.
    submit_ack_timeout_s: float = Field(60.0, gt=0)
    # The longest output frame a rank sends with "zmq": the ingress's socket drops the connection of
    # a sender whose message is longer (ZMQ_MAXMSGSIZE), so a stranger who reaches the port cannot
    # make the ingress buffer gigabytes. No output is cut by it: a batch is every chunk the rank queued
    # since its last send (an engine step's worth, kilobytes, unless the ingress stalled: then without
    # bound), and the rank splits one that does not fit into several frames, down to a chunk of one
    # character and one token (deployments/rank_outbox.py, `fitting_payloads`). 64 MiB holds about
    # 800,000 one-token chunks (about 83 bytes each) in one frame; at least 1 MiB, which any chunk that
    # cannot be split fits in (one token, an error message, `prompt_tokens`).
    max_output_frame_bytes: int = Field(64 << 20, ge=1 << 20)
    # Request limits, checked in the ingress before anything reaches a rank. A body over
    # `max_body_bytes` is refused with 413 while it is read (8 MiB holds a 128k-token prompt as token
    # ids); a text prompt (or a chat's messages together) over `max_prompt_chars` is a 400 before it is
    # tokenized (about 4 characters a token: 2M characters is several times the longest context any
    # config here serves; raise both for longer contexts). After tokenizing, the rank checks the
    # prompt's tokens against `engine.max_model_len` (400).
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_prompt_chars: int = Field(2_000_000, ge=1)
    # While the DP group is re-formed, at most this many new requests wait for it (for at most
    # `recovery_wait_s`); beyond it a request gets 503 with Retry-After at once.
    max_waiting_during_recovery: int = Field(256, ge=0)
    ingress_num_cpus: float = 0.1
    # Graceful shutdown (`dpserve shutdown`, SIGTERM/Ctrl-C to `dpserve serve`): new API requests get
    # 503 + Retry-After, those in flight may finish for up to this long, then Serve is shut down.
    # Serve's own drain on `serve.delete`/redeploy is `graceful_shutdown_timeout_s` (ray_configs).
    drain_timeout_s: float = 30.0
    # Required as `Authorization: Bearer <key>` on every route but /health; unset: the environment
    # variable DPSERVE_API_KEY of the ingress replica, else no key (deployments/api_key.py).
    api_key: SecretStr | None = None
    # Liveness. A request not finished this long after it was sent to its rank gets a 504 and is
    # aborted there (None: no deadline). A rank that has requests in flight but whose engine makes no
    # step for `hang_timeout_s` is declared hung and the group is re-formed (a step of the largest
    # models takes well under a second; EPLB's weight moves run between steps). The ingress reports
    # itself unhealthy to Serve (which then replaces it) when a re-formation has not succeeded
    # within `max_recovery_s` (at least `rank_start_timeout_s`: one attempt must fit; None: twice
    # `rank_start_timeout_s`).
    request_timeout_s: float | None = Field(None, gt=0)
    hang_timeout_s: float = Field(60.0, gt=0)
    max_recovery_s: float | None = Field(None, gt=0)

    @property
    def recovery_bound_s(self) -> float:
        return self.max_recovery_s if self.max_recovery_s is not None else 2 * self.rank_start_timeout_s

    @model_validator(mode="after")
    def _recovery_fits_a_start(self) -> ServingSection:
        if self.max_recovery_s is not None and self.max_recovery_s < self.rank_start_timeout_s:
            raise ValueError(
                f"max_recovery_s ({self.max_recovery_s:g}) must be at least rank_start_timeout_s "
                f"({self.rank_start_timeout_s:g}): one start attempt must fit"
            )
        return self


class EngineSettings(EngineSection):
    """What every rank of a group is started from: the engine section plus the balance and eplb
    sections the engines need (a plain, picklable value handed to each rank actor)."""

    balance: BalanceSection | None = None
    eplb: EplbSection | None = None

    @property
    def eplb_enabled(self) -> bool:
        return self.eplb is not None and self.eplb.enabled

    def engine_args(
        self,
        rank: int,
        dp_address: str,
        dp_rpc_port: int,
        platform: Platform | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for `AsyncEngineArgs` of DP rank `rank` (external load balancing: one
        engine per rank, ranks joined through `dp_address:dp_rpc_port`); the platform's defaults
        are `platform`'s, else `self.platform`'s (the group sets it), else this process's."""
        platform = platform or self.resolved_platform()
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
        args.update(self.engine_kwargs)  # none of the group's own arguments (EngineSection's check)
        if self.eplb_enabled:
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
        additional = dict(self.engine_kwargs.get("additional_config") or {})
        additional["dpserve_balance"] = self.balance.scheduler_config() if self.balance else {}
        return {"scheduler_cls": scheduler_cls, "additional_config": additional}


class DPServeConfig(_Section):
    """Everything `build_app` accepts (a Serve config's `args`)."""

    engine: EngineSection = Field(default_factory=EngineSection)
    balance: BalanceSection | None = None
    eplb: EplbSection | None = None
    serving: ServingSection = Field(default_factory=ServingSection)

    @classmethod
    def from_args(cls, args: dict[str, Any] | DPServeConfig | None) -> DPServeConfig:
        """Validate a Serve config's `args`; raises ConfigError naming every offending key."""
        if isinstance(args, DPServeConfig):
            return args
        try:
            return cls.model_validate(dict(args or {}))
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc)) from None

    @property
    def rank_settings(self) -> EngineSettings:
        """What each rank of the group is started from."""
        return EngineSettings(**self.engine.model_dump(), balance=self.balance, eplb=self.eplb)

    @property
    def queue_bound(self) -> int:
        return self.serving.max_queued_per_rank or 4 * self.engine.max_num_seqs


def describe_errors(exc: ValidationError) -> str:
    """One line per problem, each naming its key as a dotted path (e.g. `engine.data_parallel_sise`)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err.get("loc", ())) or "args"
        if err.get("type") == "extra_forbidden":
            hint = "; raw vLLM arguments go under engine.engine_kwargs" if key.startswith("engine.") else ""
            lines.append(f"unknown key {key!r}{hint}")
        else:
            lines.append(f"{key}: {err.get('msg', 'invalid')}")
    return "invalid dpserve config: " + "; ".join(lines)
