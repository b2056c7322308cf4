"""The simulator's configuration: one dataclass per concern, loaded from YAML.

Unknown keys are errors (a misspelt cost parameter silently falling back to a default would make a
calibration meaningless). Every field is documented where it is declared; `ray_configs/
sim-deepseek-v3.yaml` is the calibrated instance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """The MoE model's shape (DeepSeek-V3 defaults)."""

    name: str = "DeepSeek-V3.1"
    num_moe_layers: int = 58  # DeepSeek-V3: 61 layers, the first 3 dense (folded into per-token cost)
    num_experts: int = 256  # routed experts per MoE layer
    top_k: int = 8  # experts per token


@dataclass
class ClusterConfig:
    """DP ranks and each rank's vLLM scheduler limits.

    One simulated rank is one DP rank (an engine with its TP group); expert parallelism spans all
    ranks (EP group = DP group), so each rank hosts (num_experts + num_redundant) / num_ranks slots.
    """

    num_ranks: int = 4
    max_num_seqs: int = 32  # vLLM --max-num-seqs, per rank
    max_num_batched_tokens: int = 8192  # vLLM token budget per step, per rank
    long_prefill_token_threshold: int = 0  # vLLM: cap on a prefill chunk; 0 = no cap (chunk at budget)
    # Steps between the counts a gate decision reads and the step it applies to: the coordinator
    # decides step s + lead from the reports of step s, and async scheduling adds one more.
    gate_lag_steps: int = 0
    # KV-cache capacity per rank in tokens; 0 = unlimited. When the running requests' next tokens do
    # not fit, the newest running request is preempted and later recomputed (vLLM's recompute mode),
    # and waiting requests are admitted only while KV is free.
    kv_cache_tokens: int = 0


@dataclass
class WorkloadConfig:
    """Requests and the benchmark client (vLLM's `bench serve` semantics)."""

    num_requests: int = 512
    input_len: int = 3500
    output_len: int = 1500
    # 0 = fixed lengths (the seed's random dataset with range ratio 0); r > 0 draws uniformly from
    # [len * (1 - r), len * (1 + r)].
    len_range_ratio: float = 0.0
    request_rate: float = math.inf  # requests/s (Poisson); inf = all ready at t = 0
    # Requests per arrival event: events are Poisson at request_rate / burst_size and each brings
    # burst_size requests at once (1 = plain Poisson arrivals).
    burst_size: int = 1
    # Spread of output lengths alone (same meaning as len_range_ratio); None = len_range_ratio. An EOS
    # before the requested length is what spreads output lengths in a run without --ignore-eos.
    output_len_range_ratio: float | None = None
    max_concurrency: int | None = 128  # client-side cap on requests in flight; None = unlimited
    # Time from the client sending a request to the engine holding it (HTTP, tokenizing 3.5K tokens,
    # queues in the API server). TTFT is measured from the send, as vLLM's benchmark does.
    client_delay_s: float = 0.02
    # Mean of an exponential extra delay per request (API-server queueing behind output processing);
    # it decides in which engine step a request lands, so it desynchronises the ranks.
    client_delay_jitter_s: float = 0.0


@dataclass
class RouterConfig:
    """How the API server picks a DP rank for a new request.

    ``least_loaded_stale`` is vLLM's DP load balancer: score = 4 * waiting + running on counts the
    coordinator publishes every ``stats_interval_s`` (100 ms in vLLM), plus the router's own local
    increments between publishes; ties go to the lowest rank. ``least_loaded`` uses exact counts;
    ``round_robin`` ignores load. ``dpserve`` is dpserve's ingress, through the product's own
    `deployments.router.pick_rank` (its exact in-flight count per rank plus the engines' counts as of
    the last stats, every ``stats_interval_s``): use it to plan a dpserve deployment
    (``--set router.kind=dpserve``); the seed-calibrated configs keep vLLM's router, which the seed ran.
    """

    kind: str = "least_loaded_stale"
    stats_interval_s: float = 0.1


@dataclass
class ExpertConfig:
    """Expert routing skew and drift, and the layer aggregation used for speed.

    Each simulated layer has per-expert log-popularities following an Ornstein-Uhlenbeck process with
    stationary standard deviation ``skew_sigma`` and correlation time ``drift_timescale_s``; routed
    token counts per step are Poisson around tokens * top_k * softmax(log-popularity). Only
    ``sim_layers`` representative layers are simulated; their MoE and all-to-all times are scaled by
    num_moe_layers / sim_layers.
    """

    sim_layers: int = 4
    skew_sigma: float = 0.6
    drift_timescale_s: float = 120.0
    # Redundant physical slots in total; at start-up slot E + j holds expert j % E (EPLB's default).
    num_redundant: int = 0
    # Share of each layer's log-popularity variance that is common to all layers: expert j is hot in
    # many layers at once, so under the identity placement one rank is the busiest in most layers
    # (per-layer max/mean then adds up instead of averaging out over the 58 layers).
    layer_correlation: float = 0.0
    # Per-layer skew grows with depth: a layer at relative depth d in [0, 1] has std
    # skew_sigma * (1 + depth_skew * (2 d - 1)); 0 gives every layer skew_sigma. Published DeepSeek-R1
    # serving traces show the first layers close to balanced and deeper ones more skewed.
    depth_skew: float = 0.0
    # A recorded load trace replaces the synthetic model: a .npy in `dpserve eplb plan --loads` format,
    # float [layers, num_experts] (a fixed popularity), or a stack float [windows, layers, num_experts]
    # replayed window by window, each for `trace_window_steps` steps (cycling). Layers are sampled
    # evenly down to sim_layers.
    loads_file: str | None = None
    trace_window_steps: int = 1000


@dataclass
class EplbConfig:
    """Expert re-placement with the real `eplb.policies` on a cadence; ``policy: none`` disables it."""

    policy: str = "none"
    interval_steps: int = 1000  # re-plan every this many steps on the load seen since the last plan
    # async: one layer moves per step after the plan, on a side stream overlapped with that step's
    # compute (vllm-ascend/dpserve style); sync: every layer moves in one stop-the-world stall. The
    # costs are `TransferConfig`'s (see `cluster.sim.transfer`).
    mode: str = "async"
    params: dict[str, Any] = field(default_factory=dict)  # passed to eplb.policies.rebalance
    # async: real layers moved per step, one after another on the side stream (the product's
    # `eplb.layers_per_step`); a plan takes effect sooner, each such step carries more transfer.
    layers_per_step: int = 1
    # async: each layer's new placement takes effect once that layer has moved (the product and
    # SwiftBalancer commit layer by layer); false holds every layer until the last one has moved.
    commit_per_layer: bool = True
    # null: plan on the load seen since the last plan; a number: on all load seen, weighted by
    # 0.5 ** (age in seconds / window_half_life_s) (eplb.load.DecayingLoad), never reset by a plan.
    window_half_life_s: float | None = None
    # null: the first plan waits a full interval; a number: the first plan once the window covers this
    # many steps (`eplb.pacing.plan_due`), so the start-up placement does not hold through the first
    # whole-group prefill. The default keeps every committed figure.
    first_plan_steps: int | None = None
    # async: move as many layers per step as the side stream finishes within the step's compute, at
    # least layers_per_step (`eplb.pacing.layers_this_step`): long prefill steps land a plan sooner.
    layers_fit_step: bool = False


@dataclass
class CostConfig:
    """Named step-time parameters (seconds). See `cluster.sim.costs` for the formula.

    A rank's time in a step = step_overhead_s + rank_fixed_s + dense_per_token_s * tokens
    + attn_decode_per_ctx_token_s * sum(decode context) + attn_prefill_per_token_pair_s * sum(prefill
    token pairs) + MoE + all-to-all, where MoE and all-to-all are per-layer terms paid by every rank and
    set by the most loaded EP rank. The step takes the slowest rank's time (lockstep).
    """

    step_overhead_s: float = 0.015  # host: scheduling, sampling, launch, output processing
    rank_fixed_s: float = 0.012  # reading attention/dense weights once per step (memory bound)
    dense_per_token_s: float = (
        55e-6  # non-expert compute per scheduled token (attention proj., shared expert)
    )
    attn_decode_per_ctx_token_s: float = 2e-9  # KV-cache reads per token of decode context
    attn_prefill_per_token_pair_s: float = 8e-9  # causal attention per (query, key) pair in prefill
    moe_layer_fixed_s: float = 0.00045  # reading one layer's local expert weights
    moe_per_expert_token_s: float = 0.15e-6  # grouped GEMM per routed (token, expert) on the busiest rank
    a2a_layer_fixed_s: float = 0.0002  # dispatch + combine latency per layer
    a2a_per_expert_token_s: float = 0.08e-6  # dispatch + combine bytes per routed (token, expert)


@dataclass
class TransferConfig:
    """What moving expert weights costs (EPLB); the formulas are in `cluster.sim.transfer`.

    Defaults: DeepSeek-V3 experts in 8-bit weights on Ascend A2-class nodes. Each field names its
    source; only ``p2p_op_latency_s`` is fitted (benchmarks/fit_eplb_transfer.py).
    """

    # DeepSeek-V3 config.json: hidden_size 7168, moe_intermediate_size 2048; an expert is three
    # matrices (gate, up, down) of hidden x intermediate.
    hidden_size: int = 7168
    moe_intermediate_size: int = 2048
    # Bytes per weight: 1 for fp8 (DeepSeek-V3's released weights) or w8a8 int8 (vllm-ascend's
    # quantised DeepSeek), 2 for bf16. 8-bit weights carry one fp32 scale per 128 x 128 block
    # (DeepSeek-V3 fp8 block quantisation); bf16 none.
    bytes_per_param: float = 1.0
    scale_block: int = 128
    ranks_per_node: int = 8  # Atlas 800 A2 / HGX: 8 accelerators per node
    # One HCCS link of Ascend 910B: 56 GB/s (Huawei Atlas 800T A2 datasheet: 7 links, 392 GB/s).
    # An expert moves over one link; NVLink 4 (H100) would be 450 GB/s per direction.
    intra_node_bw_Bps: float = 56e9
    # Scale-out NIC per accelerator: 200 Gb/s RoCE = 25 GB/s (Atlas 800T A2: 8 x 200GE; H100 HGX
    # nodes carry 400 Gb/s = 50 GB/s per GPU).
    inter_node_bw_Bps: float = 25e9
    # HBM bandwidth, for the copy from the receive buffer into the expert weights (read + write):
    # Ascend 910B HBM2e about 1.6 TB/s (H100 SXM 3.35 TB/s).
    hbm_bw_Bps: float = 1.6e12
    # Fixed cost per p2p send/recv op (HCCL set-up, rendezvous, launch). Fitted to SwiftBalancer's
    # measurement: batch_isend_irecv of 16 experts took more than 100 ms on an A2 server
    # (vllm-ascend PR "SwiftBalancer", vllm-project/vllm-ascend); see benchmarks/fit_eplb_transfer.py.
    p2p_op_latency_s: float = 0.00546
    # Per layer applied asynchronously: wait on the side stream's event and swap the layer's
    # expert map (log2phy) on the device: one host-device synchronisation plus a few small kernels,
    # about 0.1 ms on NPU/GPU runtimes. A prior, not fitted.
    async_sync_s: float = 1e-4


@dataclass
class GateConfig:
    """Which gate policies a run compares, and their parameters."""

    policies: list[str] = field(default_factory=lambda: ["off", "any_at_cap"])
    params: dict[str, dict[str, Any]] = field(default_factory=lambda: {"cadence": {"interval": 4}})


@dataclass
class SimConfig:
    """Everything one simulation needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    eplb: EplbConfig = field(default_factory=EplbConfig)
    costs: CostConfig = field(default_factory=CostConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    # The measured figures this config is calibrated against, carried into reports unchanged.
    reference: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError for settings the simulator cannot honour."""
        c, m, e = self.cluster, self.model, self.experts
        if c.num_ranks < 1 or c.max_num_seqs < 1:
            raise ValueError("cluster.num_ranks and cluster.max_num_seqs must be >= 1")
        if c.gate_lag_steps < 0:
            raise ValueError("cluster.gate_lag_steps must be >= 0")
        w = self.workload
        longest = int(w.input_len * (1 + w.len_range_ratio)) + int(
            w.output_len
            * (1 + (w.len_range_ratio if w.output_len_range_ratio is None else w.output_len_range_ratio))
        )
        if c.kv_cache_tokens and c.kv_cache_tokens < longest:
            raise ValueError(
                f"cluster.kv_cache_tokens must be 0 (unlimited) or hold the longest request ({longest})"
            )
        if c.max_num_batched_tokens < c.max_num_seqs:
            raise ValueError("cluster.max_num_batched_tokens must be >= max_num_seqs (vLLM requires it)")
        if (m.num_experts + e.num_redundant) % c.num_ranks:
            raise ValueError(
                f"num_experts + num_redundant ({m.num_experts} + {e.num_redundant}) must divide evenly "
                f"over {c.num_ranks} ranks"
            )
        if not 1 <= e.sim_layers <= m.num_moe_layers:
            raise ValueError("experts.sim_layers must be between 1 and model.num_moe_layers")
        if self.router.kind not in ("least_loaded_stale", "least_loaded", "round_robin", "random", "dpserve"):
            raise ValueError(f"router.kind {self.router.kind!r} unknown")
        if self.eplb.mode not in ("async", "sync"):
            raise ValueError("eplb.mode must be 'async' or 'sync'")
        if self.eplb.interval_steps < 1 or self.eplb.layers_per_step < 1:
            raise ValueError("eplb.interval_steps and eplb.layers_per_step must be >= 1")
        fp = self.eplb.first_plan_steps
        if fp is not None and not (isinstance(fp, int) and fp >= 1):
            raise ValueError("eplb.first_plan_steps must be null or an integer >= 1")
        hl = self.eplb.window_half_life_s
        if hl is not None and not (isinstance(hl, (int, float)) and hl > 0):
            raise ValueError("eplb.window_half_life_s must be null or > 0")
        if not 0.0 <= e.layer_correlation <= 1.0:
            raise ValueError("experts.layer_correlation must be in [0, 1]")
        if not 0.0 <= e.depth_skew <= 1.0:
            raise ValueError("experts.depth_skew must be in [0, 1]")
        if e.trace_window_steps < 1:
            raise ValueError("experts.trace_window_steps must be >= 1")
        tr = self.transfer
        if min(tr.intra_node_bw_Bps, tr.inter_node_bw_Bps, tr.hbm_bw_Bps, tr.bytes_per_param) <= 0:
            raise ValueError("transfer: bandwidths and bytes_per_param must be > 0")
        if tr.ranks_per_node < 1:
            raise ValueError("transfer.ranks_per_node must be >= 1")
        bad = [p for p in self.gate.policies if not isinstance(p, str)]
        if bad:
            raise ValueError(
                f"gate.policies must be names; got {bad!r} (quote 'off' in YAML: unquoted it is false)"
            )
        w = self.workload
        if w.num_requests < 1 or w.input_len < 1 or w.output_len < 1:
            raise ValueError("workload: num_requests, input_len and output_len must be >= 1")
        if w.burst_size < 1:
            raise ValueError("workload.burst_size must be >= 1")
        if w.max_concurrency is not None and w.max_concurrency < 1:
            raise ValueError("workload.max_concurrency must be >= 1 or null")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses; unknown keys fail."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}".lstrip("."))
        elif isinstance(default, float) and isinstance(value, (int, str)):
            kwargs[name] = float(value)  # YAML writes `inf` as a string and 1 as an int
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> SimConfig:
    """Build and validate a SimConfig from a nested dict (the YAML's structure)."""
    cfg = _build(SimConfig, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None) -> SimConfig:
    """Load a YAML config file; ``None`` gives the built-in defaults."""
    if path is None:
        cfg = SimConfig()
        cfg.validate()
        return cfg
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    return config_from_dict(data)


def apply_overrides(cfg: SimConfig, overrides: list[str]) -> SimConfig:
    """Apply ``section.key=value`` overrides (value parsed as YAML) and re-validate."""
    data = dataclasses.asdict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ValueError(f"override {item!r}: no section {part!r}")
            node = node[part]
        if parts[-1] not in node and not (len(parts) > 1 and parts[-2] in ("params",)):
            raise ValueError(f"override {item!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(data)
