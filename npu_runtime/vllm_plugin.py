"""dpserve's vLLM general plugin (entry point `vllm.general_plugins: dpserve_platform`).

vLLM loads general plugins in every process it starts (API server, engine cores, workers), before
models are built. On CPU this plugin closes the gaps that stop an MoE model from serving with data
and expert parallelism in vLLM 0.32:

* `CpuCommunicator.all_gatherv` / `reduce_scatterv` (the base class raises NotImplementedError);
* the CPU unquantized experts kernel ignores `expert_map`: under expert parallelism it receives
  global expert ids while holding only its local experts (a segfault on the first request). We map
  ids to local ones and zero the weight of tokens routed to experts held by another rank.

Patches are applied once per process, only on the platforms that need them, and only where vLLM
still lacks the method (so a vLLM that grows its own implementation wins).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("dpserve.plugin")

_APPLIED: set[str] = set()


def _patch_cpu_communicator() -> None:
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    from npu_runtime import cpu_collectives

    if CpuCommunicator.all_gatherv is DeviceCommunicatorBase.all_gatherv:

        def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
            return cpu_collectives.all_gatherv(
                self.device_group, self.world_size, self.rank_in_group, input_, dim, sizes
            )

        CpuCommunicator.all_gatherv = all_gatherv

    if CpuCommunicator.reduce_scatterv is DeviceCommunicatorBase.reduce_scatterv:

        def reduce_scatterv(self, input_, dim: int = -1, sizes: list[int] | None = None):
            return cpu_collectives.reduce_scatterv(
                self.device_group, self.world_size, self.rank_in_group, input_, dim, sizes
            )

        CpuCommunicator.reduce_scatterv = reduce_scatterv


def local_expert_ids(topk_ids, topk_weights, expert_map):
    """Map global expert ids to this rank's local ids; tokens for remote experts get weight 0.

    topk_ids / topk_weights: [tokens, top_k]; expert_map: [global_experts], -1 where not local.
    The masked entries point at local expert 0 so the kernel's indexing stays in range.
    """
    local = expert_map[topk_ids.long()]
    remote = local < 0
    return local.clamp_min(0).to(topk_ids.dtype), topk_weights.masked_fill(remote, 0.0)


def _patch_cpu_experts_expert_map() -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    cls = cpu_moe.CPUUnquantizedExperts
    if getattr(cls.apply, "_dpserve_expert_map", False):
        return
    original = cls.apply

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, *args, **kwargs):  # fmt: skip
        if expert_map is not None:
            topk_ids, topk_weights = local_expert_ids(topk_ids, topk_weights, expert_map)
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, None, *args, **kwargs)  # fmt: skip

    apply._dpserve_expert_map = True  # type: ignore[attr-defined]
    cls.apply = apply


# Niceness for dpserve's engine-core processes (set by the rank actor; unset: inherited). Ray starts
# its workers at nice 15, so engines inherit 15 while Ray's daemons run at 0.
ENGINE_NICE_ENV = "DPSERVE_ENGINE_NICE"


def _set_engine_priority() -> None:
    """Give this engine-core process the niceness asked for in ENGINE_NICE_ENV (only engine cores:
    vLLM names their processes EngineCore*; the frontend in the rank actor keeps Ray's)."""
    nice = os.environ.get(ENGINE_NICE_ENV)
    if not nice:
        return
    import multiprocessing

    if not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(nice))
    except (PermissionError, ValueError) as exc:  # lowering niceness needs CAP_SYS_NICE
        logger.warning("dpserve: engine core kept niceness %d (%s=%s: %s)", os.getpriority(os.PRIO_PROCESS, 0),
                       ENGINE_NICE_ENV, nice, exc)  # fmt: skip


def register() -> None:
    """vLLM general-plugin entry point."""
    if os.environ.get("DPSERVE_DISABLE_PLUGIN") == "1":
        return
    _set_engine_priority()
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and "cpu" not in _APPLIED:
        _patch_cpu_communicator()
        _patch_cpu_experts_expert_map()
        _APPLIED.add("cpu")
        logger.debug("dpserve: CPU all_gatherv/reduce_scatterv and expert_map support installed")
    if "eplb" not in _APPLIED:
        # Online EPLB hooks (routing through placement tables, per-step DP agreement); inert until
        # eplb.applier attaches tables, and needed before any model is built.
        from npu_runtime import eplb_hooks

        try:
            eplb_hooks.install()
        except Exception:  # a vLLM without these internals still serves, just without online EPLB
            logger.exception("dpserve: EPLB hooks not installed")
        _APPLIED.add("eplb")
