"""Slot weights, `log2phy` and load on vllm-ascend MoE layers (eplb.ascend.slots), with stand-in layers
built by vllm-ascend 0.23.0.post1's own start-up code (tests/eplb/ascend/standins.py): a plan applied
through the worker state moves weight rows and the routing row in place, load comes from the
layers' `expert_tokens`, and layers that do not fit are refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eplb.agreement import EplbWorkerState
from eplb.ascend.placement import startup_phy2log, write_expert_map
from eplb.ascend.slots import AscendModelSlots, install_load_hook
from eplb.ascend.transfer import BatchedExchanger
from eplb.ascend.worker import check_weight_names, install_step_sync, is_ascend_worker
from eplb.messages import PlanMessage
from npu_runtime import eplb_hooks
from tests.eplb.ascend.standins import encoded, standin_layers

E, EP, R, LAYERS = 8, 2, 2, 2  # spr = 5: rank 0 holds experts [0, 1, 2, 3, 4], rank 1 [4, 5, 6, 7, 0]


@pytest.fixture
def rank0(vllm_ascend_eplb: SimpleNamespace, tmp_path: Path) -> tuple[list, AscendModelSlots]:
    phy2log = startup_phy2log(LAYERS, E, EP, R)
    path = write_expert_map(tmp_path / "map.json", phy2log, EP)
    layers = standin_layers(vllm_ascend_eplb, path, phy2log, EP, ep_rank=0)
    return layers, AscendModelSlots.from_layers(layers)


def test_slots_read_the_placement_vllm_ascend_allocated(rank0) -> None:
    layers, slots = rank0
    assert (slots.num_logical, slots.num_redundant, slots.spr, slots.ep_size, slots.ep_rank) == (
        E,
        R,
        5,
        EP,
        0,
    )
    assert slots.phy2log.tolist() == startup_phy2log(LAYERS, E, EP, R).tolist()
    assert slots.bytes_per_expert == (6 * 4 + 4 * 3) * 4
    w13, w2 = slots.weights(1)
    assert (
        w13.data_ptr() == layers[1].w13_weight.data_ptr() and w2.data_ptr() == layers[1].w2_weight.data_ptr()
    )


def test_a_plan_moves_rows_and_log2phy_in_place(rank0) -> None:
    layers, slots = rank0
    old = slots.phy2log.copy()
    new = old.copy()
    new[1, 4] = 3  # rank 0's redundant slot: expert 4 -> a second copy of expert 3 (a local copy)
    ptrs = [(m.w13_weight.data_ptr(), m.w2_weight.data_ptr(), m.log2phy.data_ptr()) for m in layers]
    log2phy_before = layers[1].log2phy.clone()
    state = EplbWorkerState(slots, dp_size=1, exchanger=BatchedExchanger(slots))
    layer0 = layers[0].log2phy.clone()
    out = state.stage(PlanMessage(1, old, new, EP, blocking=True))
    assert out["accepted"] and out.get("committed"), out
    assert slots.phy2log.tolist() == new.tolist()
    m = layers[1]
    assert torch.equal(m.w13_weight.data[4], encoded(3, 1, (6, 4)))  # the slot now holds expert 3
    assert torch.equal(m.w2_weight.data[4], -encoded(3, 1, (4, 3)))
    assert torch.equal(m.w13_weight.data[3], encoded(3, 1, (6, 4)))  # its source is unchanged
    # Rank 0 routes expert 3 to replica 0 % 2 (slot 3) and expert 4 to its one slot left (slot 5).
    assert m.log2phy[3].item() == 3 and log2phy_before[4].item() == 4 and m.log2phy[4].item() == 5
    assert m.log2phy.dtype == torch.int32
    assert [(m.w13_weight.data_ptr(), m.w2_weight.data_ptr(), m.log2phy.data_ptr()) for m in layers] == ptrs
    assert torch.equal(layers[0].log2phy, layer0)  # an unchanged layer keeps its row


def test_load_comes_from_expert_tokens_under_the_placement_in_force(rank0) -> None:
    layers, slots = rank0
    for i, m in enumerate(layers):
        install_load_hook(m, i, slots.recorder)
    with pytest.raises(RuntimeError, match="already counted"):
        install_load_hook(layers[0], 0, slots.recorder)
    layers[0].quant_method.next_tokens = torch.tensor([1, 2, 3, 4, 5])
    layers[1].quant_method.next_tokens = torch.tensor([2, 2, 2, 2, 2])
    layers[1].quant_method.group_list_type = 0  # running sums, as some dispatchers report: [2, 4, 6, ...]
    layers[1].quant_method.next_tokens = torch.tensor([2, 4, 6, 8, 10])
    for m in layers:
        m.forward()
        m.forward()
    taken = slots.recorder.take()
    assert taken["steps"] == 2 and taken["calls"] == 4
    assert taken["physical"][0] == [2, 4, 6, 8, 10, 0, 0, 0, 0, 0]  # rank 0's slots only
    assert taken["counts"][0] == [2, 4, 6, 8, 10, 0, 0, 0]  # slot 4 holds expert 4
    assert taken["counts"][1] == [4, 4, 4, 4, 4, 0, 0, 0]
    assert slots.recorder.take()["counts"][0] == [0] * E  # drained

    # A commit folds what was counted under the old placement before it changes the layer.
    layers[1].quant_method.group_list_type = 1
    layers[1].quant_method.next_tokens = torch.tensor([0, 0, 0, 0, 7])
    layers[1].forward()
    new = slots.phy2log.copy()
    new[1, 4] = 3
    state = EplbWorkerState(slots, dp_size=1, exchanger=BatchedExchanger(slots))
    state.stage(PlanMessage(2, slots.phy2log.copy(), new, EP, True))
    layers[1].forward()
    counts = slots.recorder.take()["counts"][1]
    assert counts[4] == 7 and counts[3] == 7  # 7 tokens for expert 4 before, 7 for expert 3 after

    # Steps from the worker's step ends; a result that does not fit stops recording, not the forward.
    slots.recorder.external_steps = True
    layers[0].forward()
    slots.recorder.step()
    assert slots.recorder.take()["steps"] == 1
    layers[0].quant_method.next_tokens = torch.tensor([1, 2])
    assert layers[0].forward().expert_tokens.tolist() == [1, 2]
    assert not slots.recorder.enabled and "2 entries, 5 slots" in slots.recorder.error


def test_layers_that_do_not_fit_are_refused(rank0) -> None:
    layers, _ = rank0
    layers[1].dynamic_eplb = True
    with pytest.raises(RuntimeError, match="dynamic EPLB is on"):
        AscendModelSlots.from_layers(layers)
    layers[1].dynamic_eplb = False
    layers[1].log2phy[0] = 9  # a replica choice ours would not make
    with pytest.raises(RuntimeError, match="differs from vllm-ascend's"):
        AscendModelSlots.from_layers(layers)
    layers[1].log2phy = None  # no expert_map_path: vllm-ascend allocated no slots
    with pytest.raises(RuntimeError, match="allocated no EPLB slots"):
        AscendModelSlots.from_layers(layers)


def test_slot_tensors_must_be_the_two_we_move(vllm_ascend_on_path: Path) -> None:
    from vllm_ascend.eplb.adaptor.vllm_adaptor import EPLB_EXPERT_WEIGHT_NAMES
    from vllm_ascend.quantization.quant_type import QuantType

    check_weight_names(EPLB_EXPERT_WEIGHT_NAMES[(QuantType.NONE, False)])
    with pytest.raises(NotImplementedError, match="quantized"):
        check_weight_names(EPLB_EXPERT_WEIGHT_NAMES[(QuantType.W8A8, False)])


class _Runner:
    """The parts of NPUModelRunner the step sync reads; `synced` records vllm-ascend's own calls."""

    __module__ = "vllm_ascend.worker.model_runner_v1"

    def __init__(self, dp_size: int, dp_rank: int) -> None:
        self.dp_size, self.dp_rank, self.synced = dp_size, dp_rank, []

    def _sync_metadata_across_dp(self, num_tokens, is_draft_model=False, cudagraph_mode=None,
                                 allow_dp_padding=False):  # fmt: skip
        self.synced.append((num_tokens, is_draft_model))
        return num_tokens, None, cudagraph_mode


class _Participant:
    num_rows = 2

    def __init__(self) -> None:
        self.sums: list[list[int]] = []

    def contribute(self) -> list[int]:
        return [3, 4]

    def on_sums(self, sums: list[int], dp_size: int) -> None:
        self.sums.append(sums)


def test_step_sync_rides_after_vllm_ascends_dp_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    reduced = []

    def all_reduce(t: torch.Tensor, group=None) -> None:  # two ranks contributing the same rows
        reduced.append((t.clone(), group))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    runner = _Runner(dp_size=2, dp_rank=1)
    worker = SimpleNamespace(model_runner=runner)
    assert is_ascend_worker(worker) and not is_ascend_worker(SimpleNamespace(model_runner=object()))
    assert install_step_sync(runner, group="dp-cpu") and not install_step_sync(runner, group="dp-cpu")
    p = _Participant()
    steps = eplb_hooks.dp_steps()
    eplb_hooks.register_step_sync(p)
    try:
        assert runner._sync_metadata_across_dp(5) == (5, None, None)  # vllm-ascend's result as is
        runner._sync_metadata_across_dp(5, True)  # a draft model's sync: no rows, no step
        runner._sync_metadata_across_dp(num_tokens=5, is_draft_model=True)
    finally:
        eplb_hooks.unregister_step_sync(p)
    runner._sync_metadata_across_dp(6)  # no participant: counted, nothing reduced
    assert runner.synced == [(5, False), (5, True), (5, True), (6, False)]
    assert eplb_hooks.dp_steps() == steps + 2
    assert len(reduced) == 1 and reduced[0][1] == "dp-cpu"
    assert reduced[0][0].tolist() == [[0, 3], [0, 4]]  # rows x DP ranks, this rank's column filled
    assert p.sums == [[6, 8]]
