"""The EPLB worker state on Ascend: the hooks on the worker the platform names.

vllm-ascend's platform sets `worker_cls` to `vllm_ascend.worker.worker.NPUWorker` (when left "auto"),
whose `NPUModelRunner` overrides vLLM's step: vLLM's per-step DP all-reduce (`dp_utils._run_ar`,
which the CPU/GPU path patches) is not called; the runner's own `_sync_metadata_across_dp` is. So:

* step timing: eplb.steplog.StepLog wraps the worker's `execute_model` / `sample_tokens` /
  `execute_dummy_batch` per instance, as on CPU (NPUWorker defines all three);
* step sync: `install_step_sync` wraps `model_runner._sync_metadata_across_dp` per instance. After
  vllm-ascend's own all-reduce, when a participant is registered (npu_runtime.eplb_hooks), one more
  all-reduce carries its rows over the DP group's CPU group. Not on the same all-reduce as on CPU:
  that would need a copy of vllm-ascend's function body. Every DP rank runs it at the same point of
  the same step (vllm-ascend's all-reduce is itself a collective there); a draft model's call and a
  DP size of 1 add nothing. The wrap also counts DP steps (`eplb_hooks.dp_steps`), so it is
  installed as soon as the rank group first asks for that count, before set-up;
* slots, load and transfers: eplb.ascend.slots and eplb.ascend.transfer.

Every vllm-ascend symbol used here is declared in npu_runtime.ascend_patches (feature `ascend_eplb`)
and `state_from_worker` refuses to start when one does not fit.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from npu_runtime import eplb_hooks

logger = logging.getLogger("dpserve.eplb.ascend")


def is_ascend_worker(worker: Any) -> bool:
    """Whether `worker` runs vllm-ascend's model runner (NPUWorker and its variants)."""
    runner = getattr(worker, "model_runner", None)
    return runner is not None and type(runner).__module__.startswith("vllm_ascend.")


def _dp_cpu_group() -> Any:
    from vllm.distributed.parallel_state import get_dp_group

    return get_dp_group().cpu_group


def install_step_sync(runner: Any, group: Any = None) -> bool:
    """Wrap `runner._sync_metadata_across_dp` (once; returns whether it wrapped now). `group`: the
    group the participants' rows are all-reduced over (default: vLLM's DP CPU group, looked up at
    the first step that needs it)."""
    original = runner._sync_metadata_across_dp
    if getattr(original, "_dpserve", False):
        return False
    groups = [group]

    def _sync_metadata_across_dp(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        # Parameters (num_tokens, is_draft_model, cudagraph_mode, allow_dp_padding), checked by
        # npu_runtime.ascend_patches.
        draft = kwargs.get("is_draft_model", args[1] if len(args) > 1 else False)
        dp_size = int(runner.dp_size)
        if draft or dp_size == 1:
            return out
        eplb_hooks.count_dp_step()
        extra = eplb_hooks.extra_rows()
        if extra:
            import torch.distributed as dist

            if groups[0] is None:
                groups[0] = _dp_cpu_group()
            t = torch.zeros(extra, dp_size, dtype=torch.int32)
            t[:, int(runner.dp_rank)] = torch.tensor(eplb_hooks.contributions(), dtype=torch.int32)
            dist.all_reduce(t, group=groups[0])
            eplb_hooks.deliver_sums([int(x) for x in t.sum(dim=1).tolist()], dp_size)
        return out

    _sync_metadata_across_dp._dpserve = True  # type: ignore[attr-defined]
    _sync_metadata_across_dp.__wrapped__ = original  # type: ignore[attr-defined]
    runner._sync_metadata_across_dp = _sync_metadata_across_dp
    return True


def moe_layers(model: Any) -> list[Any]:
    """vllm-ascend's MoE layers of `model` in construction order (the layer ids of its expert map)."""
    from vllm_ascend.ops.fused_moe.fused_moe import AscendFusedMoE

    return sorted(
        (m for m in model.modules() if isinstance(m, AscendFusedMoE)), key=lambda m: m.moe_instance_id
    )


def check_weight_names(names: tuple[str, ...]) -> None:
    """The slot tensors vllm-ascend names for a layer's quantization (EPLB_EXPERT_WEIGHT_NAMES) must be
    the two the exchanger moves."""
    from eplb.slots import WEIGHTS

    if tuple(names) != WEIGHTS:
        raise NotImplementedError(f"EPLB on Ascend moves {WEIGHTS}; this layer's expert slots are {names} "
                                  "(quantized or fused-MC2 weights)")  # fmt: skip


def state_from_worker(worker: Any, num_redundant: int, layers_per_step: int = 1) -> Any:
    """EplbWorkerState over an NPUWorker: slots from vllm-ascend's layers, the load hook, a transfer
    group over the EP ranks (HCCL), step timing and the step sync. A collective: every worker of the
    group calls it at the same time, with the group idle."""
    from vllm_ascend.ascend_config import get_ascend_config
    from vllm_ascend.eplb.adaptor.vllm_adaptor import EPLB_EXPERT_WEIGHT_NAMES
    from vllm_ascend.quantization.quant_type import QuantType

    from eplb.agreement import EplbWorkerState, ep_transfer_group
    from eplb.ascend.slots import AscendModelSlots, install_load_hook
    from eplb.ascend.transfer import BatchedExchanger
    from eplb.steplog import StepLog
    from npu_runtime import ascend_patches

    ascend_patches.require("ascend_eplb")
    model = worker.model_runner.get_model()
    layers = moe_layers(model)
    fused_mc2 = get_ascend_config().enable_fused_mc2 == 1
    for m in layers:
        quant = QuantType.NONE if getattr(model, "quant_config", None) is None else m.quant_type
        check_weight_names(EPLB_EXPERT_WEIGHT_NAMES[(quant, fused_mc2)])
    parallel = worker.vllm_config.parallel_config
    slots = AscendModelSlots.from_layers(layers, int(parallel.tensor_parallel_size))
    if num_redundant and slots.num_redundant != int(num_redundant):
        raise RuntimeError(f"eplb.num_redundant is {num_redundant}, vllm-ascend allocated "
                           f"{slots.num_redundant} redundant slots from its expert map")  # fmt: skip
    for i, m in enumerate(layers):
        install_load_hook(m, i, slots.recorder)
    group, group_ranks = ep_transfer_group(slots.ep_size, "hccl")
    steplog = StepLog()
    steplog.install(worker)
    slots.recorder.external_steps = True  # steps from the worker's step ends (graph replays included)
    steplog.on_end.append(slots.recorder.step)
    dp_size = int(parallel.data_parallel_size)
    state = EplbWorkerState(
        slots, dp_size, BatchedExchanger(slots, group, group_ranks), layers_per_step, steplog
    )
    if dp_size > 1:
        install_step_sync(worker.model_runner)
        state.prep.start()
        eplb_hooks.register_step_sync(state)
    return state
