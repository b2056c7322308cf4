"""Every place dpserve patches, wraps, subclasses or reaches into vLLM, with the check each must pass.

`PATCHES` lists each vLLM symbol dpserve touches: the feature that needs it, how it is touched and
the parameters the patch expects. `checks()` (run by the vLLM plugin at load, and by the rank
before it starts an engine) imports each symbol and compares its signature (inspect.signature); a
feature whose symbols do not all fit is refused: `require(feature)` raises `VllmPatchError` naming
the vLLM version and each symbol that does not fit, and `install()` applies no patch of it.
`report()` is the state for operators (`dpserve status`, through the rank's stats).

A feature's check runs before anything is patched, so a vLLM whose internals moved never runs half
a patch set. Where behaviour must differ between vLLM versions, it branches here and only here.

Features:
* `cpu_dp`: MoE models with data parallelism on CPU. vLLM's `CpuCommunicator` inherits
  `all_gatherv` / `reduce_scatterv` from a base class that raises NotImplementedError; they are
  implemented with gloo collectives (npu_runtime.cpu_collectives). A vLLM that implements them wins.
* `cpu_ep`: expert parallelism on CPU. The CPU unquantized experts kernel ignores `expert_map`:
  under EP it receives global expert ids while holding only its local experts. Ids are mapped to
  local ones and tokens routed to experts held by another rank get weight 0.
* `eplb`: online EPLB. Routing through the applier's tables (`BaseRouter._apply_eplb_mapping`
  calls `router._dpserve_route` when a router has one), extra rows on the per-step DP all-reduce
  (`dp_utils._run_ar`, npu_runtime.eplb_hooks), and the applier's model surgery (MoE runners'
  routed experts grown to physical slots with `replace_parameter`, worker step entry points timed).
* `balance`: the balance scheduler (scheduler/balance_scheduler.py): `Scheduler` / `AsyncScheduler`
  subclasses that hide the waiting queue, a lockstep hook on `_has_global_unfinished_reqs` and an
  engine-core utility that reads the gate's counters.
* `rank_stats`: the rank's stat loggers (deployments/rank_stats.py), subclasses of vLLM's.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger("dpserve.vllm_patches")

FEATURES: dict[str, str] = {
    "cpu_dp": "data parallelism of MoE models on CPU",
    "cpu_ep": "expert parallelism on CPU",
    "eplb": "online expert load balancing (EPLB)",
    "balance": "the balance scheduler",
    "rank_stats": "the rank's engine stats",
}

# How a patch compares the parameter names it expects with the symbol's:
EXACT = "exact"  # the same names in the same order (the patch replaces or re-calls it positionally)
PREFIX = "prefix"  # the symbol's first parameters are these (the patch passes only these positionally)
HAS = "has"  # each of these names is a parameter (a dataclass's fields, keyword use)


@dataclass(frozen=True)
class Patch:
    """One vLLM symbol dpserve touches. `params=None`: only its existence is checked."""

    feature: str
    module: str
    qualname: str
    how: str  # replaced | wrapped | subclassed | added-to | used
    params: tuple[str, ...] | None = None
    match: str = EXACT
    why: str = ""

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.qualname}"


_CPU_COMM = "vllm.distributed.device_communicators"
_MOE = "vllm.model_executor.layers.fused_moe"
_STATS_RECORD = ("self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx")

PATCHES: tuple[Patch, ...] = (
    Patch("cpu_dp", f"{_CPU_COMM}.cpu_communicator", "CpuCommunicator", "added-to",
          why="all_gatherv / reduce_scatterv set on the class when it inherits the base's"),
    Patch("cpu_dp", f"{_CPU_COMM}.base_device_communicator", "DeviceCommunicatorBase.all_gatherv",
          "replaced", ("self", "input_", "dim", "sizes")),
    Patch("cpu_dp", f"{_CPU_COMM}.base_device_communicator", "DeviceCommunicatorBase.reduce_scatterv",
          "replaced", ("self", "input_", "dim", "sizes")),
    Patch("cpu_ep", f"{_MOE}.experts.cpu_moe", "CPUUnquantizedExperts.apply", "wrapped",
          ("self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
           "global_num_experts", "expert_map"), PREFIX, why="maps global expert ids to local ones"),
    Patch("eplb", f"{_MOE}.router.base_router", "BaseRouter._apply_eplb_mapping", "wrapped",
          ("self", "topk_ids"), why="routes through the applier's tables"),
    Patch("eplb", "vllm.v1.worker.dp_utils", "_run_ar", "replaced",
          ("should_ubatch", "orig_num_tokens_per_ubatch", "padded_num_tokens_per_ubatch", "cudagraph_mode",
           "parallel_config"), why="extra rows on the per-step DP all-reduce"),
    Patch("eplb", "vllm.v1.worker.dp_utils", "_get_device_and_group", "used", ("parallel_config",)),
    Patch("eplb", f"{_MOE}.runner.moe_runner", "MoERunner.__init__", "used",
          ("moe_config", "router", "routed_experts"), HAS, why="the applier finds MoE layers by MoERunner"),
    Patch("eplb", f"{_MOE}.routed_experts", "RoutedExperts", "used",
          why="weights grown to physical slots, _expert_map replaced under EP"),
    Patch("eplb", "vllm.model_executor.utils", "replace_parameter", "used", ("layer", "param_name"), PREFIX,
          why="called with (layer, name, tensor) positionally; the third's name varies"),
    Patch("eplb", "vllm.distributed.parallel_state", "get_ep_group", "used", ()),
    Patch("eplb", "vllm.v1.worker.gpu_worker", "Worker.execute_model", "wrapped-per-instance",
          ("self", "scheduler_output"), PREFIX, why="step timing (eplb.applier.StepLog)"),
    Patch("eplb", "vllm.v1.worker.gpu_worker", "Worker.sample_tokens", "wrapped-per-instance", ("self",),
          PREFIX),
    Patch("eplb", "vllm.v1.worker.gpu_worker", "Worker.execute_dummy_batch", "wrapped-per-instance",
          ("self",), PREFIX),
    Patch("balance", "vllm.v1.core.sched.scheduler", "Scheduler.schedule", "subclassed", ("self",), PREFIX,
          why="the waiting queue hidden on closed-gate steps"),
    Patch("balance", "vllm.v1.core.sched.scheduler", "Scheduler.get_request_counts", "used", ("self",)),
    Patch("balance", "vllm.v1.core.sched.async_scheduler", "AsyncScheduler.schedule", "subclassed",
          ("self",), PREFIX),
    Patch("balance", "vllm.v1.core.sched.request_queue", "create_request_queue", "used", ("policy",)),
    Patch("balance", "vllm.v1.core.sched.request_queue", "RequestQueue.prepend_request", "used",
          ("self", "request")),
    Patch("balance", "vllm.v1.engine.core", "DPEngineCoreProc._has_global_unfinished_reqs", "wrapped",
          ("self", "local_unfinished"), why="the lockstep point (step_counter, current_wave)"),
    Patch("balance", "vllm.v1.engine.core", "EngineCore", "added-to",
          why="utility dpserve_balance_stats, called through call_utility_async"),
    Patch("rank_stats", "vllm.v1.metrics.loggers", "StatLoggerBase.__init__", "subclassed",
          ("self", "vllm_config", "engine_index")),
    Patch("rank_stats", "vllm.v1.metrics.loggers", "StatLoggerBase.record", "subclassed", _STATS_RECORD),
    Patch("rank_stats", "vllm.v1.metrics.loggers", "PrometheusStatLogger.__init__", "subclassed",
          ("self", "vllm_config", "engine_indexes")),
    Patch("rank_stats", "vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger", "used"),
    Patch("rank_stats", "vllm.v1.metrics.stats", "SchedulerStats", "used",
          ("num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs", "kv_cache_usage"), HAS),
)  # fmt: skip


class VllmPatchError(RuntimeError):
    """A feature refused because vLLM's symbols do not fit dpserve's patches."""


@dataclass
class Check:
    patch: Patch
    problem: str | None = None  # None: the symbol fits
    applied: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.patch.feature, "symbol": self.patch.symbol, "how": self.patch.how,
                "ok": self.problem is None, "problem": self.problem, "applied": self.applied}  # fmt: skip


@dataclass
class _State:
    checks: dict[Patch, Check] = field(default_factory=dict)
    installed: set[str] = field(default_factory=set)


_STATE = _State()


def vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception as exc:  # no vLLM at all: every feature is refused with this as the reason
        return f"unavailable ({exc!r})"


def _resolve(patch: Patch) -> Any:
    obj: Any = importlib.import_module(patch.module)
    for part in patch.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def compare_params(expected: tuple[str, ...], actual: list[str], match: str) -> str | None:
    """None when `actual` (the symbol's parameter names) fits `expected` under `match`."""
    if match == EXACT and actual == list(expected):
        return None
    if match == PREFIX and actual[: len(expected)] == list(expected):
        return None
    if match == HAS and set(expected) <= set(actual):
        return None
    return f"parameters {actual}, expected {match} {list(expected)}"


def check_patch(patch: Patch) -> str | None:
    """What is wrong with `patch`'s symbol in the running vLLM (None: it fits)."""
    try:
        obj = _resolve(patch)
    except ImportError as exc:
        return f"module {patch.module} does not import ({exc})"
    except AttributeError:
        return "does not exist"
    owner, _, name = patch.qualname.rpartition(".")
    if owner and patch.how in _APPLIED_HOW and name not in vars(_resolve(replace(patch, qualname=owner))):
        # A patch of a method the class only inherits would change every sibling class too.
        return f"is not defined on {owner} itself (inherited)"
    if patch.params is None:
        return None
    try:
        sig = inspect.signature(obj)  # follows __wrapped__: a symbol already patched shows the original
    except (TypeError, ValueError) as exc:
        return f"has no signature ({exc})"
    return compare_params(patch.params, list(sig.parameters), patch.match)


def checks(features: Iterable[str] | None = None, refresh: bool = False) -> list[Check]:
    """The checks of `features` (None: all), each run once per process (`refresh`: again, e.g. after
    a test broke a symbol)."""
    wanted = set(FEATURES if features is None else features)
    unknown = wanted - set(FEATURES)
    if unknown:
        raise KeyError(f"unknown feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}")
    out = []
    for patch in PATCHES:
        if patch.feature not in wanted:
            continue
        if refresh or patch not in _STATE.checks:
            _STATE.checks[patch] = Check(patch, check_patch(patch))
            if _STATE.checks[patch].problem is not None:
                logger.error("dpserve: %s refused on vLLM %s: %s %s", FEATURES[patch.feature], vllm_version(),
                             patch.symbol, _STATE.checks[patch].problem)  # fmt: skip
        check = _STATE.checks[patch]
        check.applied = (
            patch.feature in _STATE.installed and patch.how in _APPLIED_HOW and patch.feature in _APPLY
        )
        out.append(check)
    return out


def failures(feature: str) -> list[Check]:
    return [c for c in checks([feature]) if c.problem is not None]


def require(*features: str) -> None:
    """Raise VllmPatchError when any of `features` has a symbol that does not fit this vLLM."""
    bad = [c for f in features for c in failures(f)]
    if bad:
        names = sorted({FEATURES[c.patch.feature] for c in bad})
        details = "; ".join(f"{c.patch.symbol} {c.problem}" for c in bad)
        raise VllmPatchError(f"dpserve refuses {', '.join(names)} on vLLM {vllm_version()}: {details}")


def features_for_engine(engine_args: dict[str, Any], platform: str) -> list[str]:
    """The features a rank's engine arguments (`AsyncEngineArgs` keywords) need."""
    needed = ["rank_stats"]
    if platform == "cpu" and int(engine_args.get("data_parallel_size") or 1) > 1:
        needed.append("cpu_dp")
    if platform == "cpu" and engine_args.get("enable_expert_parallel"):
        needed.append("cpu_ep")
    if str(engine_args.get("worker_extension_cls") or "").startswith("eplb.") and platform != "npu":
        # On Ascend the EPLB worker state runs through vllm-ascend's layers and runner, not these
        # vLLM symbols; npu_runtime.ascend_patches checks the ones it uses.
        needed.append("eplb")
    if str(engine_args.get("scheduler_cls") or "").startswith("scheduler.balance_scheduler."):
        needed.append("balance")
    return needed


def require_for_engine(engine_args: dict[str, Any], platform: str) -> None:
    """Refuse (VllmPatchError) an engine whose features this vLLM cannot carry; call before building it."""
    require(*features_for_engine(engine_args, platform))


def report() -> dict[str, Any]:
    """Every patch's state in this process, for operators."""
    every = checks()
    refused = sorted({c.patch.feature for c in every if c.problem is not None})
    return {"vllm": vllm_version(), "refused": refused, "patches": [c.as_dict() for c in every]}


def summary() -> str:
    """One line for `dpserve status`: the vLLM version and the refused features, if any."""
    rep = report()
    if not rep["refused"]:
        return f"vLLM {rep['vllm']}: all {len(rep['patches'])} patches fit"
    return f"vLLM {rep['vllm']}: refused {', '.join(rep['refused'])}"


# ---- applying --------------------------------------------------------------------------------------


def _mark(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """`wrapper` stands for `original`: same name and docs, `__wrapped__` for the signature check."""
    functools.update_wrapper(wrapper, original)
    wrapper._dpserve = True  # type: ignore[attr-defined]
    return wrapper


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, "_dpserve", False))


def _apply_cpu_dp() -> None:
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    from npu_runtime import cpu_collectives

    if CpuCommunicator.all_gatherv is DeviceCommunicatorBase.all_gatherv:

        def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
            return cpu_collectives.all_gatherv(
                self.device_group, self.world_size, self.rank_in_group, input_, dim, sizes
            )

        CpuCommunicator.all_gatherv = _mark(all_gatherv, DeviceCommunicatorBase.all_gatherv)

    if CpuCommunicator.reduce_scatterv is DeviceCommunicatorBase.reduce_scatterv:

        def reduce_scatterv(self, input_, dim: int = -1, sizes: list[int] | None = None):
            return cpu_collectives.reduce_scatterv(
                self.device_group, self.world_size, self.rank_in_group, input_, dim, sizes
            )

        CpuCommunicator.reduce_scatterv = _mark(reduce_scatterv, DeviceCommunicatorBase.reduce_scatterv)


def local_expert_ids(topk_ids, topk_weights, expert_map):
    """Map global expert ids to this rank's local ids; tokens for remote experts get weight 0.

    topk_ids / topk_weights: [tokens, top_k]; expert_map: [global_experts], -1 where not local.
    The masked entries point at local expert 0 so the kernel's indexing stays in range.
    """
    local = expert_map[topk_ids.long()]
    remote = local < 0
    return local.clamp_min(0).to(topk_ids.dtype), topk_weights.masked_fill(remote, 0.0)


def _apply_cpu_ep() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    cls = cpu_moe.CPUUnquantizedExperts
    if _is_ours(cls.apply):
        return
    original = cls.apply

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):  # fmt: skip
        if expert_map is not None:
            topk_ids, topk_weights = local_expert_ids(topk_ids, topk_weights, expert_map)
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, None, *args, **kwargs)  # fmt: skip

    cls.apply = _mark(apply, original)


def _apply_eplb() -> None:
    import torch
    import torch.distributed as dist
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.worker import dp_utils

    from npu_runtime import eplb_hooks

    if not _is_ours(BaseRouter._apply_eplb_mapping):
        original_map = BaseRouter._apply_eplb_mapping

        def _apply_eplb_mapping(self, topk_ids):
            route = getattr(self, "_dpserve_route", None)
            if route is not None:
                return route(topk_ids)
            return original_map(self, topk_ids)

        BaseRouter._apply_eplb_mapping = _mark(_apply_eplb_mapping, original_map)
    if not _is_ours(dp_utils._run_ar):
        original_ar = dp_utils._run_ar

        def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch, cudagraph_mode,
                    parallel_config):  # fmt: skip
            eplb_hooks.count_dp_step()
            extra = eplb_hooks.extra_rows()
            if not extra:
                return original_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                                   cudagraph_mode, parallel_config)  # fmt: skip
            # vLLM's layout in rows 0..3 (the caller reads only those), the participants' rows after.
            dp_size, dp_rank = parallel_config.data_parallel_size, parallel_config.data_parallel_rank
            device, group = dp_utils._get_device_and_group(parallel_config)
            t = torch.zeros(4 + extra, dp_size, dtype=torch.int32)
            t[0][dp_rank] = orig_num_tokens_per_ubatch
            t[1][dp_rank] = padded_num_tokens_per_ubatch
            t[2][dp_rank] = 1 if should_ubatch else 0
            t[3][dp_rank] = cudagraph_mode
            for i, value in enumerate(eplb_hooks.contributions()):
                t[4 + i][dp_rank] = int(value)
            t = t.to(device)
            dist.all_reduce(t, group=group)
            eplb_hooks.deliver_sums([int(x) for x in t[4:].sum(dim=1).cpu().tolist()], dp_size)
            return t[:4]

        dp_utils._run_ar = _mark(_run_ar, original_ar)


def _apply_balance() -> None:
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCore

    if not _is_ours(DPEngineCoreProc._has_global_unfinished_reqs):
        original = DPEngineCoreProc._has_global_unfinished_reqs

        def _has_global_unfinished_reqs(self: Any, local_unfinished: bool) -> bool:
            result = original(self, local_unfinished)
            on_lockstep = getattr(getattr(self, "scheduler", None), "on_lockstep", None)
            if on_lockstep is not None:  # a balance scheduler: it keys its decisions by this step
                on_lockstep(self)
            return result

        DPEngineCoreProc._has_global_unfinished_reqs = _mark(_has_global_unfinished_reqs, original)

    if not hasattr(EngineCore, "dpserve_balance_stats"):

        def dpserve_balance_stats(self: Any, trace_from: int | None = None) -> dict[str, Any] | None:
            stats = getattr(getattr(self, "scheduler", None), "balance_stats", None)
            return stats(trace_from) if stats is not None else None

        dpserve_balance_stats._dpserve = True  # type: ignore[attr-defined]
        EngineCore.dpserve_balance_stats = dpserve_balance_stats  # type: ignore[attr-defined]


# The kinds of touch `install` applies itself (the others are subclasses, calls and per-instance wraps).
_APPLIED_HOW = ("replaced", "wrapped", "added-to")
# Features with something to apply (the others only subclass or call vLLM's own symbols).
_APPLY: dict[str, Callable[[], None]] = {
    "cpu_dp": _apply_cpu_dp,
    "cpu_ep": _apply_cpu_ep,
    "eplb": _apply_eplb,
    "balance": _apply_balance,
}


def install(features: Iterable[str]) -> list[str]:
    """Apply the patches of `features` whose checks pass (once per process); returns the features
    refused. A refused feature gets no patch at all; whatever needs it calls `require` and stops."""
    refused = []
    for feature in features:
        if feature in _STATE.installed:
            continue
        if failures(feature):
            refused.append(feature)
            continue
        apply = _APPLY.get(feature)
        if apply is not None:
            apply()
        _STATE.installed.add(feature)
    return refused


def installed() -> set[str]:
    return set(_STATE.installed)
