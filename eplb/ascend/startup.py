"""Engine arguments for EPLB on Ascend: the redundant slots vllm-ascend allocates at start-up.

vllm-ascend has EPLB slots only when `additional_config.eplb_config.expert_map_path` names a placement
file at engine start (eplb.ascend.placement). The rank writes that file on its own node, from the
model's config, before it builds the engine; every rank of the group derives the same placement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eplb.ascend.dispatch import refuse_allgather_with_redundant, top_k_of
from eplb.ascend.placement import moe_shape, startup_additional_config


def ep_size_of(engine_args: dict[str, Any]) -> int:
    """EP ranks of an engine (`AsyncEngineArgs` keywords): DP x TP under expert parallelism, else 1."""
    if not engine_args.get("enable_expert_parallel"):
        return 1
    return int(engine_args.get("data_parallel_size") or 1) * int(engine_args.get("tensor_parallel_size") or 1)


def with_startup_slots(engine_args: dict[str, Any], num_redundant: int, path: str | Path,
                       hf_config: Any = None, device: str | None = None) -> dict[str, Any]:  # fmt: skip
    """`engine_args` with the `eplb_config` that makes vllm-ascend allocate `num_redundant` redundant
    slots (its dynamic EPLB off); writes the expert map to `path`. `hf_config`: the model's config
    (read from `engine_args["model"]` when None); `device`: the chip type vllm-ascend was built for
    (read from the installed vllm-ascend when None). Raises ValueError without expert parallelism
    (vllm-ascend allocates slots only under EP) or when the arguments already set an `eplb_config`,
    and AscendPatchError when redundant slots would run through vllm-ascend's AllGather dispatch
    (eplb.ascend.dispatch), before any file is written."""
    ep_size = ep_size_of(engine_args)
    if ep_size == 1:
        raise ValueError("EPLB on Ascend needs expert parallelism over more than one rank "
                         "(vllm-ascend allocates redundant slots only under EP)")  # fmt: skip
    additional = dict(engine_args.get("additional_config") or {})
    if "eplb_config" in additional:
        raise ValueError("additional_config.eplb_config is set: dpserve's EPLB sets it on Ascend")
    if hf_config is None:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(
            engine_args["model"], trust_remote_code=bool(engine_args.get("trust_remote_code"))
        )
    experts, _ = moe_shape(hf_config)
    refuse_allgather_with_redundant(engine_args, int(num_redundant), experts, top_k_of(hf_config), device)
    additional.update(startup_additional_config(path, hf_config, ep_size, int(num_redundant)))
    return {**engine_args, "additional_config": additional}
