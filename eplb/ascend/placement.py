"""Placement tables of the Ascend adapter (pure numpy / torch; no vllm-ascend import).

Slot layout, as vllm-ascend's MoE path reads it: physical slot s (global) lives on EP rank s // spr at
local row s % spr (spr = (E + R) / ep_size slots per rank). vllm-ascend routes a logical expert e
through one `log2phy[e]` per rank (int32 [E]): every rank picks one of e's replicas, so the tokens a
rank sends to a replicated expert all go to the same replica, and ranks spread over the replicas.

* Start-up: redundant slots exist only when vllm-ascend's `additional_config.eplb_config` names an
  `expert_map_path` (its dynamic updater stays off). `expert_map_file` writes that file for
  `startup_phy2log`, whose ranks each hold distinct experts: vllm-ascend builds a rank's logical ->
  local map from the file (one row per expert) and numbers slots by the count of distinct experts on
  rank 0, so a rank holding one expert twice would shift every physical id.
* Plans: later placements may hold an expert twice on one rank (our tables number slots by position,
  not by distinct experts); `rank_log2phy` gives each rank's row from eplb.slots.layer_tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def startup_phy2log(num_layers: int, num_logical: int, ep_size: int, num_redundant: int) -> np.ndarray:
    """phy2log int64 [layers, E + R] loaded at start-up: EP rank q holds its block of experts
    [q*lne, (q+1)*lne) in its first lne slots, then the experts after its block ((q+1)*lne + j) % E,
    so no rank holds an expert twice. Needs E and R divisible by ep_size and spr <= E."""
    if num_logical % ep_size or num_redundant % ep_size:
        raise ValueError(f"{num_logical} experts and {num_redundant} redundant slots must both divide "
                         f"over {ep_size} EP ranks")  # fmt: skip
    lne = num_logical // ep_size
    spr = lne + num_redundant // ep_size
    if spr > num_logical:
        raise ValueError(f"{spr} slots per rank cannot hold distinct experts out of {num_logical}")
    row: list[int] = []
    for q in range(ep_size):
        row += [q * lne + j for j in range(lne)] + [
            ((q + 1) * lne + j) % num_logical for j in range(spr - lne)
        ]
    return np.tile(np.asarray(row, dtype=np.int64), (num_layers, 1))


def distinct_per_rank(phy2log: np.ndarray, ep_size: int) -> bool:
    """Whether no EP rank holds one expert in two slots of a layer (phy2log int [layers, E + R])."""
    p = np.asarray(phy2log)
    per_rank = p.reshape(p.shape[0], ep_size, -1)
    srt = np.sort(per_rank, axis=2)
    return not bool((srt[:, :, 1:] == srt[:, :, :-1]).any())


def expert_map_file(phy2log: np.ndarray, ep_size: int, layer_count: int | None = None) -> dict[str, Any]:
    """vllm-ascend's expert map (the JSON `eplb_config.expert_map_path` names) for phy2log int
    [layers, E + R]: per layer, per EP rank ("device"), the experts of its slots in slot order.

    `layer_count` (>= layers) writes more layers than phy2log has, repeating its last row: vllm-ascend
    numbers MoE layers by construction order (draft-model MoE layers after the main model's) and
    rejects a layer id past the file's count, while the count is known before start-up only as an
    upper bound (the model config's decoder layers)."""
    p = np.asarray(phy2log, dtype=np.int64)
    if not distinct_per_rank(p, ep_size):
        raise ValueError("a start-up placement must not hold an expert twice on one EP rank")
    count = p.shape[0] if layer_count is None else int(layer_count)
    if count < p.shape[0]:
        raise ValueError(f"layer_count {count} < {p.shape[0]} layers")
    spr = p.shape[1] // ep_size
    layers = []
    for i in range(count):
        row = p[min(i, p.shape[0] - 1)]
        devices = [
            {"device_id": q, "device_expert": row[q * spr : (q + 1) * spr].tolist()} for q in range(ep_size)
        ]
        layers.append({"layer_id": i, "device_count": ep_size, "device_list": devices})
    return {"moe_layer_count": count, "layer_list": layers}


def write_expert_map(
    path: str | Path, phy2log: np.ndarray, ep_size: int, layer_count: int | None = None
) -> Path:
    """Write `expert_map_file(...)` to `path` (must end in .json, as vllm-ascend checks) atomically."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"{path}: vllm-ascend reads an expert map only from a .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(expert_map_file(phy2log, ep_size, layer_count)))
    os.replace(tmp, path)
    return path


def eplb_additional_config(expert_map_path: str | Path) -> dict[str, Any]:
    """The `additional_config` entry that makes vllm-ascend allocate the slots of our expert map at
    start-up, with its own dynamic EPLB (updater, load collection, worker process) left off."""
    return {"eplb_config": {"expert_map_path": str(expert_map_path), "dynamic_eplb": False}}


def replica_choice(replica_count: torch.Tensor, ep_rank: int, tp_size: int = 1) -> torch.Tensor:
    """Which replica (index into an expert's slots in slot order) EP rank `ep_rank` routes each
    logical expert to: int64 [E] from replica_count int [E]. The rule vllm-ascend applies when it
    builds `log2phy` at start-up (eplb_utils.generate_log2phy_map), so plans keep its spread:
    ep_rank % n, or with TP > 1 (ep_rank % tp + ep_rank // tp + e) % n."""
    rc = replica_count.to(torch.int64).clamp_min(1)
    if tp_size > 1:
        e = torch.arange(rc.numel(), dtype=torch.int64)
        return (ep_rank % tp_size + ep_rank // tp_size + e) % rc
    return torch.full_like(rc, ep_rank) % rc


def rank_log2phy(
    table: torch.Tensor, replica_count: torch.Tensor, ep_rank: int, tp_size: int = 1
) -> torch.Tensor:
    """EP rank `ep_rank`'s `log2phy` row int32 [E] from our tables: table int64 [E, cap] (each expert's
    slots in slot order, -1 padded; eplb.slots.layer_tables) and replica_count int [E]."""
    pick = replica_choice(replica_count, ep_rank, tp_size)
    return table.gather(1, pick.unsqueeze(1)).squeeze(1).to(torch.int32)


def phy2log_from_expert_maps(global_expert_map: np.ndarray, spr: int) -> np.ndarray:
    """One layer's phy2log int64 [ep_size * spr] from vllm-ascend's `global_expert_map` int
    [ep_size, E] (per rank, logical expert -> local row, -1 where absent). Raises ValueError when a
    slot is left empty (a rank held an expert twice in its start-up file: not representable there)."""
    gmap = np.asarray(global_expert_map, dtype=np.int64)
    ep_size = gmap.shape[0]
    row = np.full(ep_size * spr, -1, dtype=np.int64)
    ranks, experts = np.nonzero(gmap >= 0)
    local = gmap[ranks, experts]
    if (local >= spr).any():
        raise ValueError(f"expert map has local rows >= {spr} slots per rank")
    row[ranks * spr + local] = experts
    if (row < 0).any():
        raise ValueError(
            f"slots {np.flatnonzero(row < 0).tolist()} hold no expert in vllm-ascend's expert map"
        )
    return row


def moe_shape(hf_config: Any) -> tuple[int, int]:
    """(routed experts E, an upper bound on the MoE layers vllm-ascend numbers) of a model's Hugging
    Face config: its decoder layers plus its MTP layers (`num_nextn_predict_layers`), which vllm-ascend
    numbers after the main model's."""
    cfg = getattr(hf_config, "text_config", None) or hf_config
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        experts = getattr(cfg, name, None)
        if experts:
            break
    else:
        raise ValueError("the model config names no routed experts (n_routed_experts / num_experts)")
    layers = int(cfg.num_hidden_layers) + int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    return int(experts), layers


def startup_additional_config(
    path: str | Path, hf_config: Any, ep_size: int, num_redundant: int
) -> dict[str, Any]:
    """Write the start-up expert map of a model (its config `hf_config`) over `ep_size` EP ranks with
    `num_redundant` redundant slots to `path`, and return the `additional_config` entry naming it.
    Every rank of the group writes and passes the same file (the placement is a function of these)."""
    experts, layers = moe_shape(hf_config)
    write_expert_map(path, startup_phy2log(layers, experts, ep_size, num_redundant), ep_size)
    return eplb_additional_config(path)
