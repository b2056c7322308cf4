"""Stand-ins for vllm-ascend's MoE layers, built by vllm-ascend's own start-up code.

`standin_layers` runs vllm-ascend's `init_eplb_config` on an expert map we wrote, as
`AscendFusedMoE.__init__` does, and wraps what it returns (global expert map, local expert map,
`log2phy`, redundant count) with slot weights whose rows encode (layer, expert) and a quant method
whose results carry `expert_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


def encoded(expert: int, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One slot's weights for `expert` of `layer`: every entry 100 * layer + expert."""
    return torch.full(shape, float(100 * layer + expert))


class StandInQuantMethod:
    """Returns what vllm-ascend's quant methods return to the MoE forward: a FusedExpertsResult-like
    object; `next_tokens` (per local slot) is what the next call reports."""

    def __init__(self, spr: int) -> None:
        self.next_tokens = torch.zeros(spr, dtype=torch.int64)
        self.group_list_type = 1

    def apply(self, layer: Any, **kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(routed_out=None, expert_tokens=self.next_tokens.clone(),
                               group_list_type=self.group_list_type)  # fmt: skip


class StandInMoE:
    """The attributes of AscendFusedMoE the adapter reads (declared in npu_runtime.ascend_patches)."""

    def __init__(self, index: int, gmap: torch.Tensor, local_map: torch.Tensor, log2phy: torch.Tensor,
                 n_redundant: int, ep_rank: int, phy2log_row: np.ndarray) -> None:  # fmt: skip
        ep_size, _ = gmap.shape
        spr = len(phy2log_row) // ep_size
        self.moe_instance_id = index
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.local_num_experts = spr
        self.global_redundant_expert_num = n_redundant
        self.global_expert_map, self._expert_map, self.log2phy = gmap, local_map, log2phy
        self.dynamic_eplb = False
        mine = phy2log_row[ep_rank * spr : (ep_rank + 1) * spr]
        self.w13_weight = torch.nn.Parameter(torch.stack([encoded(e, index, (6, 4)) for e in mine]), False)
        self.w2_weight = torch.nn.Parameter(-torch.stack([encoded(e, index, (4, 3)) for e in mine]), False)
        self.quant_method = StandInQuantMethod(spr)

    def forward(self) -> Any:
        return self.quant_method.apply(layer=self)


def standin_layers(eplb: SimpleNamespace, expert_map: Path, phy2log: np.ndarray, ep_size: int, ep_rank: int,
                   tp_size: int = 1) -> list[StandInMoE]:  # fmt: skip
    """One stand-in per layer of `phy2log`, from vllm-ascend's init_eplb_config on `expert_map`."""
    cfg = eplb.EplbConfig({"expert_map_path": str(expert_map), "dynamic_eplb": False})
    num_logical = int(phy2log.max()) + 1
    moe_config = SimpleNamespace(num_experts=num_logical, ep_size=ep_size, ep_rank=ep_rank)
    layers = []
    for i in range(phy2log.shape[0]):
        gmap, local_map, log2phy, n_red = eplb.utils.init_eplb_config(
            cfg, i, moe_config, False, 0, tp_size=tp_size
        )
        layers.append(StandInMoE(i, gmap, local_map, log2phy, n_red, ep_rank, phy2log[i]))
    return layers
