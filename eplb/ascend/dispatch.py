"""The token dispatcher vllm-ascend runs an EP engine's MoE layers with, and the one combination dpserve
refuses: vllm-ascend's AllGather dispatch with redundant expert slots.

Read in vllm-ascend 0.23.0.post1's sources (nothing here has run on an NPU):

* `MoECommMethod.fused_experts` (ops/fused_moe/moe_comm_method.py) maps the router's logical ids to
  physical slots (`log2phy[topk_ids]`, ids in [0, E + R)) before `token_dispatch`.
* `TokenDispatcherWithAllGather.token_dispatch` (ops/fused_moe/token_dispatcher.py) then masks the
  routing weights with `expert_map[topk_ids] != -1`, where `expert_map` is the layer's `_expert_map`,
  which `init_eplb_config` (eplb/core/eplb_utils.py) builds as int32 [E], logical expert -> local row.
  Physical ids >= E index past its end; ids < E ask whether the *logical* expert of that number is on
  this rank, which is not the slot the token was sent to.
* AllGather gives every EP rank every token (`PrepareAndFinalizeWithAllGather` gathers the hidden states
  and router logits before routing), and each rank maps them through its own `log2phy` row, whose
  replica choice differs per rank (`generate_log2phy_map`: replica `ep_rank % n`). A token for a
  replicated expert is computed by every rank whose own choice is local (two ranks of a two-replica
  expert at start-up: counted twice in the reduce-scatter) or by none.

Without redundant slots both hold: physical ids equal the start-up logical ids, each expert has one slot,
and the start-up map's "on this rank" is exactly the rank's slot range, so moves keep the mask right.
The other dispatchers (MC2, fused MC2, all-to-all) take `expert_map` only for its length and send each
token from its own rank, so the per-rank replica choice is theirs to make.

Which dispatcher runs is vllm-ascend's `select_moe_comm_method` (ascend_forward_context.py), chosen per
step from the chip the package was built for (`vllm_ascend/_build_info.py`), the EP size, the experts,
top-k and the step's token count against the MC2 token capacity. `allgather_reachable` is that rule,
asked "can any step pick AllGather?"; where it depends on what is known only in the engine (the capacity
without `enable_prefill_mc2`, the largest step), the answer is yes.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path
from typing import Any

from npu_runtime.ascend_patches import AscendPatchError, source_root, version

READ_IN = "0.23.0.post1"  # the vllm-ascend whose sources this rule and the defects were read in
DEVICE_TYPES = ("A2", "A3", "_310P", "A5")  # vllm_ascend.utils.AscendDeviceType
MC2_TOKENS_PER_TP_RANK = 512  # set_mc2_tokens_capacity's cap


def device_type(root: Path | None = None) -> str | None:
    """The chip type vllm-ascend was built for, as its `_init_ascend_device_type` reads it from the
    generated `vllm_ascend/_build_info.py` (read, not imported); None without that file."""
    root = root or source_root()
    path = None if root is None else root / "vllm_ascend" / "_build_info.py"
    if path is None or not path.is_file():
        return None
    values: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = str(node.value.value)
    if "__device_type__" in values:
        return values["__device_type__"]
    soc = values.get("__soc_version__", "ASCEND910B1").upper()
    return "_310P" if "310P" in soc else "A2"


def mc2_capacity(tp_size: int, max_num_batched_tokens: int | None, enable_prefill_mc2: bool) -> int | None:
    """vllm-ascend's MC2 token capacity (`set_mc2_tokens_capacity`) where it is known before the engine
    starts: with `enable_prefill_mc2` it follows from max_num_batched_tokens; otherwise it comes from the
    engine's graph capture sizes or request limit (None here)."""
    if not enable_prefill_mc2 or not max_num_batched_tokens:
        return None
    per_tp_rank = min(math.ceil(int(max_num_batched_tokens) / tp_size), MC2_TOKENS_PER_TP_RANK)
    return per_tp_rank * tp_size


def allgather_reachable(device: str, *, ep_size: int, world_size: int, num_experts: int, top_k: int,
                        mc2_capacity: int | None, max_step_tokens: int | None) -> bool:  # fmt: skip
    """Whether vllm-ascend's `select_moe_comm_method` picks `MoECommType.ALLGATHER` for some step of
    an engine with expert parallelism over `ep_size` ranks (DP x TP; 1 without expert parallelism;
    `world_size`: DP x TP x PP ranks;
    `num_experts`: routed experts; steps of 1..max_step_tokens tokens). Unknown capacity or step
    size (None) counts as "some step exceeds the capacity". Raises ValueError for an unknown chip."""
    if device not in DEVICE_TYPES:
        raise ValueError(f"unknown Ascend device type {device!r} (known: {', '.join(DEVICE_TYPES)})")
    if ep_size <= 1 or device == "_310P":
        return True
    over_capacity = mc2_capacity is None or max_step_tokens is None or max_step_tokens > mc2_capacity
    if device == "A2":  # MC2 only for many ranks with few experts each, and only within the capacity
        return not (num_experts // ep_size <= 24 and ep_size >= 16) or over_capacity
    if device == "A5":  # over the capacity: all-gather when the ranks do not outnumber top-k
        return world_size <= top_k and over_capacity
    return False  # A3: MC2 / fused MC2 within the capacity, all-to-all (or fused MC2) above it


def top_k_of(hf_config: Any) -> int:
    """Experts per token, read as vllm-ascend's A5 rule reads it from the model's text config."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    return int(getattr(cfg, "num_experts_per_tok", getattr(cfg, "top_k_experts", 1)))


def refuse_allgather_with_redundant(engine_args: dict[str, Any], num_redundant: int, num_experts: int,
                                    top_k: int, device: str | None = None,
                                    root: Path | None = None) -> None:  # fmt: skip
    """Raise AscendPatchError when `num_redundant` > 0 redundant slots would run through vllm-ascend's
    AllGather dispatch in some step (engine_args: `AsyncEngineArgs` keywords; `device`: the chip type,
    read from the installed vllm-ascend when None; an unreadable one is refused, as it may be A2)."""
    if num_redundant <= 0:
        return
    found = version(root)
    device = device or device_type(root)
    setting = f"eplb.num_redundant={num_redundant}"
    what = (f"dpserve refuses online expert load balancing (EPLB) with redundant slots ({setting}) on "
            f"vllm-ascend {found}")  # fmt: skip
    why = (f"vllm-ascend's AllGather token dispatch (MoECommType.ALLGATHER, TokenDispatcherWithAllGather) "
           f"indexes the logical expert map [E] with physical slot ids and maps each rank's gathered tokens "
           f"through that rank's own replica choice (read in vllm-ascend {READ_IN}; "
           f"see eplb/ascend/dispatch.py); set eplb.num_redundant: 0 (EPLB moves experts without "
           f"replicas), or run where vllm-ascend picks MC2 / all-to-all (Atlas A3)")  # fmt: skip
    if device is None:
        raise AscendPatchError(f"{what}: cannot read which chip it was built for (vllm_ascend/_build_info.py),"
                               f" so it may pick AllGather: {why}")  # fmt: skip
    tp = int(engine_args.get("tensor_parallel_size") or 1)
    dp = int(engine_args.get("data_parallel_size") or 1)
    pp = int(engine_args.get("pipeline_parallel_size") or 1)
    additional = engine_args.get("additional_config") or {}
    max_tokens = engine_args.get("max_num_batched_tokens")
    cap = mc2_capacity(tp, max_tokens, bool(additional.get("enable_prefill_mc2", False)))
    ep = dp * tp if engine_args.get("enable_expert_parallel") else 1
    if allgather_reachable(device, ep_size=ep, world_size=dp * tp * pp, num_experts=num_experts, top_k=top_k,
                           mc2_capacity=cap, max_step_tokens=max_tokens):  # fmt: skip
        raise AscendPatchError(f"{what}, built for {device}, where it picks AllGather for some steps: {why}")
