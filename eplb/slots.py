"""Physical expert slots and routing tables of one worker's model (the model surgery).

Per MoE layer (i = ordinal among the model's MoE layers):

* Physical slots: the layer's packed weights `w13_weight [lne, 2I, H]` / `w2_weight [lne, H, I]`
  are enlarged once, after loading, to `spr = (E + R) / ep_size` rows (R redundant slots). Slot s
  (global) lives on EP rank s // spr at local row s % spr. The CPU kernel takes the slot count from
  dim 0 and, under EP, our plugin's expert_map patch maps physical ids to local rows through a
  static [E + R] table (-1 where the slot is on another rank).
* Routing: the router's mapping step (npu_runtime.eplb_hooks) calls `LayerRouting`, which maps
  the j-th choice of expert e in the batch to `log2phy[e, (j + offset) % replica_count[e]]`
  (`replica_index`: offset from the batch's content) and records both ids (per logical expert
  and per physical slot, eplb.recorder). Both tables are
  preallocated ([E, 1 + R] and [E]) and only ever updated in place, so compiled graphs see updates.
* Initial placement: what vLLM loaded. EP rank q holds its linear block of experts
  [q*lne, (q+1)*lne) in its first lne slots, its extra slots replicate its own experts (no transfer
  at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eplb.policies import placement_from_phy2log
from eplb.recorder import ExpertLoadRecorder

WEIGHTS = ("w13_weight", "w2_weight")


def occurrence_index(ids: torch.Tensor, num_logical: int) -> torch.Tensor:
    """For each routed choice, how many earlier choices in the batch (row-major) picked the same
    expert: int64, the shape of `ids` [tokens, top_k] (logical ids < num_logical).

    Replica `occurrence % replica_count` splits each expert's tokens of one batch evenly over its
    replicas (within one token), whatever their batch positions: a decode batch keeps each request at
    its position, so a choice by position would send a request to the same replica every step. It
    depends on the batch alone, so every rank routing the same gathered batch (the all-gather MoE)
    picks the same replica.
    """
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_logical)
    first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in `order`
    occurrence = torch.empty_like(flat)
    occurrence[order] = torch.arange(flat.numel(), dtype=flat.dtype) - first[flat[order]]
    return occurrence.view_as(ids)


def replica_index(ids: torch.Tensor, replica_count: torch.Tensor) -> torch.Tensor:
    """Replica each routed choice takes: int64, the shape of `ids` [tokens, top_k] (logical ids),
    replica_count int64 [num_logical] (>= 1 each).

    The j-th choice of expert e in the batch (`occurrence_index`) takes replica
    (j + offset) % replica_count[e], offset = the sum of the batch's logical ids. Without an offset an
    expert whose batch count is not a multiple of its replica count always gives the extra tokens to
    its first replicas; the offset changes with the batch's choices from step to step, so the
    remainder rotates over the replicas. It is a function of the gathered batch alone (device
    tensors, no host sync), so every rank routing the same batch picks the same replica.
    """
    occurrence = occurrence_index(ids, replica_count.shape[0])
    return (occurrence + ids.sum()) % replica_count[ids]


class LayerRouting:
    """Callable installed as `router._dpserve_route` for one MoE layer.

    log2phy int64 [E, cap] (-1 padded) and replica_count int64 [E] are updated in place only.
    """

    def __init__(self, index: int, recorder: ExpertLoadRecorder, log2phy: torch.Tensor,
                 replica_count: torch.Tensor) -> None:  # fmt: skip
        self.index = index
        self.recorder = recorder
        self.log2phy = log2phy
        self.replica_count = replica_count

    def __call__(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids int [tokens, top_k] logical -> physical ids, same shape and dtype."""
        ids = topk_ids.long()
        if self.log2phy.shape[1] == 1:  # no redundant slots: one replica each, nothing to choose
            phys = self.log2phy[ids, 0]
        else:
            rep = replica_index(ids, self.replica_count)
            phys = self.log2phy[ids, rep]
        # Recorded here, where the replica each token goes to is known (int64 already: no copy).
        self.recorder.record(self.index, ids, phys)
        return phys.to(topk_ids.dtype)


@dataclass
class SlotLayer:
    """One MoE layer: `routed` holds w13_weight [spr, 2I, H] / w2_weight [spr, H, I] (vLLM's
    RoutedExperts, or any object with those two tensors), `routing` its tables."""

    routed: Any
    router: Any
    routing: LayerRouting | Any


def linear_phy2log(num_layers: int, num_logical: int, ep_size: int, spr: int) -> np.ndarray:
    """phy2log int64 [layers, ep_size * spr] of what vLLM loads: EP rank q holds experts
    [q*lne, (q+1)*lne) in its first lne slots, its extra slots replicate its own experts."""
    lne = num_logical // ep_size
    row: list[int] = []
    for q in range(ep_size):
        row += [q * lne + j for j in range(lne)] + [q * lne + (j % lne) for j in range(spr - lne)]
    return np.tile(np.asarray(row, dtype=np.int64), (num_layers, 1))


def layer_tables(phy2log_row: np.ndarray, num_logical: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing tables of one layer's placement phy2log_row int [E + R]: log2phy int64 [E, cap]
    (-1 padded) and replica_count int64 [E]."""
    place = placement_from_phy2log(np.asarray(phy2log_row)[None, :], num_logical)
    table = torch.full((num_logical, cap), -1, dtype=torch.int64)
    table[:, : place.log2phy.shape[2]] = torch.from_numpy(place.log2phy[0])
    return table, torch.from_numpy(place.replica_count[0].copy())


class ModelSlots:
    """The physical slots of this worker's MoE layers and the placement in force (`phy2log`
    int64 [layers, E + R]). Built from plain data (tests) or by `from_model` (the surgery)."""

    def __init__(
        self,
        layers: list[SlotLayer],
        phy2log: np.ndarray,
        num_logical: int,
        ep_size: int = 1,
        ep_rank: int = 0,
        bytes_per_expert: int = 0,
        recorder: ExpertLoadRecorder | None = None,
    ) -> None:
        self.layers = layers
        self.phy2log = np.asarray(phy2log, dtype=np.int64).copy()
        self.num_logical = int(num_logical)
        self.ep_size = int(ep_size)
        self.ep_rank = int(ep_rank)
        self.num_physical = int(self.phy2log.shape[1])
        self.num_redundant = self.num_physical - self.num_logical
        if self.num_physical % self.ep_size:
            raise ValueError(f"{self.num_physical} slots not divisible by {self.ep_size} EP ranks")
        self.spr = self.num_physical // self.ep_size
        self.cap = self.num_redundant + 1  # most replicas an expert can ever have
        self.bytes_per_expert = int(bytes_per_expert)
        self.recorder = recorder or ExpertLoadRecorder(len(layers), self.num_logical, self.num_physical)

    def weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [spr, 2I, H], w2 [spr, H, I]) of `layer`, the live tensors."""
        routed = self.layers[layer].routed
        return routed.w13_weight.data, routed.w2_weight.data

    def commit(self, layer: int, rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               table: torch.Tensor, replica_count: torch.Tensor, new_row: np.ndarray) -> None:  # fmt: skip
        """rows int64 [n] of `layer` <- w13 [n, 2I, H] / w2 [n, H, I] (one index_copy_ per weight,
        in place), then its tables (in place) and phy2log row."""
        lay = self.layers[layer]
        if rows.numel():
            lay.routed.w13_weight.data.index_copy_(0, rows, w13)
            lay.routed.w2_weight.data.index_copy_(0, rows, w2)
        lay.routing.log2phy.copy_(table)
        lay.routing.replica_count.copy_(replica_count)
        self.phy2log[layer] = new_row

    @classmethod
    def from_model(cls, worker: Any, num_redundant: int) -> ModelSlots:
        """Enlarge every MoE layer of the worker's model to physical slots and install the routing
        tables (vLLM's MoERunner layers; raises where the model does not fit the assumptions)."""
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
        from vllm.model_executor.utils import replace_parameter

        model = worker.model_runner.model
        runners = [m for m in model.modules() if isinstance(m, MoERunner)]
        if not runners:
            raise RuntimeError("EPLB: the model has no MoE layers")
        cfg = runners[0].moe_config
        par = cfg.moe_parallel_config
        num_logical = int(cfg.num_experts)
        ep_size = int(par.ep_size) if par.use_ep else 1
        ep_rank = int(par.ep_rank) if par.use_ep else 0
        num_physical = num_logical + int(num_redundant)
        if num_physical % ep_size:
            raise ValueError(f"{num_physical} slots not divisible by {ep_size} EP ranks")
        spr = num_physical // ep_size
        lne = num_logical // ep_size
        phy2log = linear_phy2log(len(runners), num_logical, ep_size, spr)
        cap = int(num_redundant) + 1
        recorder = ExpertLoadRecorder(len(runners), num_logical, num_physical)
        layers: list[SlotLayer] = []
        for i, runner in enumerate(runners):
            routed = runner.routed_experts
            if int(routed.local_num_experts) != lne:
                raise RuntimeError(f"layer {i}: {routed.local_num_experts} local experts, expected {lne}")
            if getattr(routed, "w13_bias", None) is not None or getattr(routed, "w2_bias", None) is not None:
                raise NotImplementedError("EPLB slots for MoE layers with expert biases")
            vmap = routed.expert_map
            if vmap is not None:  # check vLLM really loaded the linear block we assume
                own = torch.nonzero(vmap >= 0).flatten().tolist()
                if own != list(range(ep_rank * lne, (ep_rank + 1) * lne)):
                    raise RuntimeError(f"EPLB needs linear expert placement; rank holds {own}")
            extra = [j % lne for j in range(spr - lne)]
            for name in WEIGHTS:
                w = getattr(routed, name)
                new = w.new_empty((spr, *w.shape[1:]))
                new[:lne].copy_(w.data)
                if extra:
                    new[lne:].copy_(w.data[extra])
                replace_parameter(routed, name, new)
            if ep_size > 1:
                # Physical id -> local row; static: slots never change rank, only their expert does.
                emap = torch.full((num_physical,), -1, dtype=torch.int32)
                lo = ep_rank * spr
                emap[lo : lo + spr] = torch.arange(spr, dtype=torch.int32)
                routed._buffers["_expert_map"] = emap
            routing = LayerRouting(i, recorder, *layer_tables(phy2log[i], num_logical, cap))
            runner.router._dpserve_route = routing
            layers.append(SlotLayer(routed, runner.router, routing))
        first = layers[0].routed
        bytes_per_expert = sum(
            getattr(first, n)[0].numel() * getattr(first, n).element_size() for n in WEIGHTS
        )
        return cls(layers, phy2log, num_logical, ep_size, ep_rank, bytes_per_expert, recorder)
