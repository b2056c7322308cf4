"""Expert slots of vllm-ascend's MoE layers, behind eplb.slots.ModelSlots' interface.

vllm-ascend's `AscendFusedMoE` (vLLM 0.23: ops/fused_moe/fused_moe_0_23_0.py) already has what the
CPU path builds by surgery: with `eplb_config.expert_map_path` it allocates `spr` slots per rank
(`w13_weight [spr, 2I, H]`, `w2_weight [spr, H, I]`), a per-rank routing row `log2phy` int32 [E]
(logical -> physical slot) and `global_expert_map` int32 [ep_size, E] (the start-up placement). So
nothing is resized here: `AscendModelSlots` reads the placement from the layers, checks our tables
give the `log2phy` vllm-ascend computed, and a commit updates weights and `log2phy` in place (as
vllm-ascend's own D2D updater does; `_expert_map` is left as loaded, as that updater leaves it).

Load: `SlotLoadRecorder` adds each layer call's `FusedExpertsResult.expert_tokens` (tokens per local
slot; what vllm-ascend's `moe_load` accumulates, which exists only with its dynamic EPLB on) on the
device, and folds them into logical and per-slot counts on the host at `take()` and before a commit
changes the layer's placement. Each rank counts only its own slots (the tokens dispatched to it);
the EPLB actor averages the ranks' windows, which keeps the proportions the planner needs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from eplb.ascend.placement import phy2log_from_expert_maps, rank_log2phy
from eplb.slots import WEIGHTS, LayerRouting, ModelSlots, SlotLayer, layer_tables
from eplb.stats import logical_from_slots

logger = logging.getLogger("dpserve.eplb.ascend")


class SlotLoadRecorder:
    """Tokens per local slot, int64 [layers, spr] on the layers' device, folded on the host into
    `counts` int64 [layers, E] and `physical` int64 [layers, E + R] (this rank's slots only).

    `phy2log` is the slots' live placement (int64 [layers, E + R], rows replaced in place by a commit);
    `take()` has the contract of eplb.recorder.ExpertLoadRecorder.take."""

    def __init__(self, phy2log: np.ndarray, ep_rank: int, spr: int, num_logical: int,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.phy2log = phy2log
        self.ep_rank = int(ep_rank)
        self.spr = int(spr)
        self.num_logical = int(num_logical)
        self.num_layers, self.num_physical = phy2log.shape
        self.local = torch.zeros(self.num_layers, self.spr, dtype=torch.int64, device=device)
        self.counts = np.zeros((self.num_layers, self.num_logical), dtype=np.int64)
        self.physical = np.zeros((self.num_layers, self.num_physical), dtype=np.int64)
        self.enabled = True
        self.error: str | None = None  # why recording stopped, if it did
        # Steps since the last take(): counted here at layer 0's call, or, with `external_steps`, by
        # `step()` (eplb.ascend.worker hooks it to the worker's step end: inside a captured ACL graph
        # this Python runs at capture only, while the device-side add_ replays every step).
        self.steps = 0
        self.external_steps = False
        self.record_ns = 0
        self.calls = 0

    def record_slots(self, layer: int, expert_tokens: torch.Tensor, group_list_type: int) -> None:
        """Add one layer call: expert_tokens int [spr] per local slot, counts (group_list_type 1) or
        their running sum (0), as vllm-ascend's token dispatchers return them."""
        if not self.enabled:
            return
        t0 = time.perf_counter_ns()
        if layer == 0 and not self.external_steps:
            self.steps += 1
        tokens = expert_tokens.reshape(-1)[: self.spr].to(torch.int64)
        if tokens.numel() != self.spr:  # never break the forward over a count: stop, and say why
            self.enabled = False
            self.error = f"layer {layer}: expert_tokens has {expert_tokens.numel()} entries, {self.spr} slots"
            logger.error("EPLB load recording stopped: %s", self.error)
            return
        if int(group_list_type) != 1:
            tokens = torch.diff(tokens, prepend=tokens.new_zeros(1))
        self.local[layer].add_(tokens)  # stays on the device: no host sync per layer call
        self.calls += 1
        self.record_ns += time.perf_counter_ns() - t0

    def step(self) -> None:
        """One engine step ended (with `external_steps`)."""
        self.steps += 1

    def fold(self, layer: int) -> None:
        """Move `layer`'s device counts to the host under the placement in force (call before a
        commit changes it: the counts belong to the old placement)."""
        loc = self.local[layer].cpu().numpy().copy()  # on a CPU device .cpu() would share the memory
        self.local[layer].zero_()
        row = np.zeros((1, self.num_physical), dtype=np.int64)
        lo = self.ep_rank * self.spr
        row[0, lo : lo + self.spr] = loc
        self.physical[layer] += row[0]
        self.counts[layer] += logical_from_slots(row, self.phy2log[layer : layer + 1], self.num_logical)[0]

    def take(self) -> dict:
        """Drain: {"counts": [layers, E], "physical": [layers, E + R] (nested lists), "steps",
        "calls", "record_us_per_call"}."""
        for layer in range(self.num_layers):
            self.fold(layer)
        out = {
            "counts": self.counts.tolist(),
            "physical": self.physical.tolist(),
            "steps": self.steps,
            "record_us_per_call": (self.record_ns / self.calls / 1e3) if self.calls else 0.0,
            "calls": self.calls,
        }
        self.counts[:] = 0
        self.physical[:] = 0
        self.steps = self.record_ns = self.calls = 0
        return out


def install_load_hook(layer: Any, index: int, recorder: SlotLoadRecorder) -> None:
    """Count what `layer.quant_method.apply` returns (a FusedExpertsResult: `expert_tokens`,
    `group_list_type`), per instance: vllm-ascend's forward calls `self.quant_method.apply(layer=self,
    ...)`, and each layer has its own quant method (checked: a shared one would count twice)."""
    qm = layer.quant_method
    if getattr(qm.apply, "_dpserve_layer", None) is not None:
        raise RuntimeError(f"MoE layer {index}: its quant method is already counted (shared between layers?)")
    apply = qm.apply

    def counted_apply(*args: Any, **kwargs: Any) -> Any:
        result = apply(*args, **kwargs)
        tokens = getattr(result, "expert_tokens", None)
        if tokens is not None:
            recorder.record_slots(index, tokens, getattr(result, "group_list_type", 1))
        return result

    counted_apply._dpserve_layer = index  # type: ignore[attr-defined]
    qm.apply = counted_apply


class AscendModelSlots(ModelSlots):
    """ModelSlots over vllm-ascend MoE layers: `layers[i].routed` is the layer itself (its
    `w13_weight` / `w2_weight` are the slots, its `log2phy` int32 [E] this rank's routing row),
    `layers[i].routing` our tables (eplb.slots.LayerRouting: [E, cap] and [E], host side)."""

    def __init__(self, layers: list[SlotLayer], phy2log: np.ndarray, num_logical: int, ep_size: int,
                 ep_rank: int, tp_size: int = 1, bytes_per_expert: int = 0) -> None:  # fmt: skip
        super().__init__(layers, phy2log, num_logical, ep_size, ep_rank, bytes_per_expert)
        self.tp_size = int(tp_size)
        device = layers[0].routed.w13_weight.device if layers else "cpu"
        self.recorder = SlotLoadRecorder(self.phy2log, self.ep_rank, self.spr, self.num_logical, device)
        for lay in layers:  # every routing table now points at the slot recorder
            lay.routing.recorder = self.recorder

    def commit(self, layer: int, rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               table: torch.Tensor, replica_count: torch.Tensor, new_row: np.ndarray) -> None:  # fmt: skip
        """rows int64 [n] of `layer` <- w13 [n, 2I, H] / w2 [n, H, I] in place (on the weights'
        device), then the host tables, this rank's `log2phy` row (in place) and phy2log."""
        self.recorder.fold(layer)
        lay = self.layers[layer]
        moe = lay.routed
        if rows.numel():
            for name, src in zip(WEIGHTS, (w13, w2), strict=True):
                w = getattr(moe, name).data
                w.index_copy_(0, rows.to(w.device), src.to(w.device))
        lay.routing.log2phy.copy_(table)
        lay.routing.replica_count.copy_(replica_count)
        moe.log2phy.copy_(rank_log2phy(table, replica_count, self.ep_rank, self.tp_size))
        self.phy2log[layer] = new_row

    @classmethod
    def from_layers(cls, moe_layers: list[Any], tp_size: int = 1) -> AscendModelSlots:
        """Slots over vllm-ascend MoE layers (in their construction order, `moe_instance_id`), as
        vllm-ascend built them. Raises where they do not fit: no redundant slots allocated (no
        `expert_map_path`), vllm-ascend's dynamic EPLB on, shared experts mixed into the placement,
        or a `log2phy` that our tables do not reproduce."""
        if not moe_layers:
            raise RuntimeError("EPLB: the model has no vllm-ascend MoE layers")
        first = moe_layers[0]
        ep_size, ep_rank = int(first.ep_size), int(first.ep_rank)
        spr = int(first.local_num_experts)
        num_physical = spr * ep_size
        num_logical = num_physical - int(first.global_redundant_expert_num)
        cap = int(first.global_redundant_expert_num) + 1
        rows, layers = [], []
        for i, m in enumerate(moe_layers):
            if getattr(m, "log2phy", None) is None or getattr(m, "global_expert_map", None) is None:
                raise RuntimeError(
                    f"MoE layer {i}: vllm-ascend allocated no EPLB slots; start the engine with "
                    "additional_config=eplb.ascend.placement.eplb_additional_config(<expert map>)"
                )
            if getattr(m, "dynamic_eplb", False):
                raise RuntimeError("vllm-ascend's dynamic EPLB is on: it would move the same slots; "
                                   "set eplb_config.dynamic_eplb false")  # fmt: skip
            if getattr(m, "mix_placement", False):
                raise NotImplementedError("EPLB slots with shared experts in the placement (mix_placement)")
            if int(m.local_num_experts) != spr or int(m.ep_size) != ep_size:
                raise RuntimeError(f"MoE layer {i}: {m.local_num_experts} slots over {m.ep_size} ranks, "
                                   f"layer 0 has {spr} over {ep_size}")  # fmt: skip
            row = phy2log_from_expert_maps(m.global_expert_map.cpu().numpy(), spr)
            table, rc = layer_tables(row, num_logical, cap)
            ours = rank_log2phy(table, rc, ep_rank, tp_size)
            theirs = m.log2phy.detach().cpu().to(torch.int32)
            if not torch.equal(ours, theirs):
                raise RuntimeError(f"MoE layer {i}: our log2phy {ours.tolist()} differs from vllm-ascend's "
                                   f"{theirs.tolist()} (its replica choice changed?)")  # fmt: skip
            rows.append(row)
            layers.append(SlotLayer(m, None, LayerRouting(i, None, table, rc)))  # type: ignore[arg-type]
        bytes_per_expert = sum(
            getattr(first, n)[0].numel() * getattr(first, n).element_size() for n in WEIGHTS
        )
        return cls(layers, np.stack(rows), num_logical, ep_size, ep_rank, tp_size, bytes_per_expert)
