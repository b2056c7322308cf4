"""The EPLB plan message's codec and options, and the slot tables built from plain data (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb.messages import TRANSFER_DEFAULTS, PlanMessage
from eplb.plan import PlanError
from eplb.slots import ModelSlots, SlotLayer, layer_tables, linear_phy2log


def test_plan_message_round_trips_through_its_dict() -> None:
    old = np.arange(12).reshape(2, 6) % 4
    msg = PlanMessage(3, old, old[:, ::-1], 2, blocking=True, transfer={"slots_per_step": 2})
    d = msg.to_dict()
    assert d["old"] == old.tolist() and d["transfer"] == {"slots_per_step": 2} and d["blocking"] is True
    back = PlanMessage.from_dict(d)
    assert back.to_dict() == d
    assert back.options() == {**TRANSFER_DEFAULTS, "slots_per_step": 2}
    assert PlanMessage.from_dict({"plan_id": 1, "old": [], "new": [], "num_ranks": 1}).blocking is False


def test_unknown_transfer_options_are_named() -> None:
    with pytest.raises(PlanError, match=r"unknown transfer options \['bogus'\]"):
        PlanMessage(1, [], [], 1, transfer={"bogus": 1, "inline": False}).options()


@pytest.mark.parametrize("bad", [{"link_gb_per_s": 0}, {"link_gb_per_s": "fast"}, {"piece_latency_ms": -1}])
def test_fit_step_costs_out_of_range_are_refused(bad) -> None:
    with pytest.raises(PlanError, match="link_gb_per_s must be > 0 and piece_latency_ms >= 0"):
        PlanMessage(1, [], [], 1, transfer={"fit_step": True, **bad}).options()


def test_linear_placement_and_tables() -> None:
    # 4 experts on 2 EP ranks with 3 slots each: rank q holds its two experts, then a replica of its first.
    assert linear_phy2log(2, 4, 2, 3).tolist() == [[0, 1, 0, 2, 3, 2]] * 2
    table, count = layer_tables(np.array([0, 1, 0, 2, 3, 2]), num_logical=4, cap=3)
    assert count.tolist() == [2, 1, 2, 1]
    assert table.tolist() == [[0, 2, -1], [1, -1, -1], [3, 5, -1], [4, -1, -1]]


def test_model_slots_from_plain_data_commit_in_place() -> None:
    phy2log = linear_phy2log(1, 4, 2, 3)
    routed = type("Routed", (), {})()
    routed.w13_weight = torch.zeros(3, 2, 2)
    routed.w2_weight = torch.zeros(3, 2, 1)
    table, count = layer_tables(phy2log[0], 4, 3)
    routing = type("Routing", (), {"log2phy": table.clone(), "replica_count": count.clone()})()
    slots = ModelSlots([SlotLayer(routed, None, routing)], phy2log, num_logical=4, ep_size=2, ep_rank=0)
    assert (slots.spr, slots.cap, slots.num_redundant) == (3, 3, 2)
    new_row = np.array([0, 1, 1, 2, 3, 2])
    new_table, new_count = layer_tables(new_row, 4, 3)
    rows = torch.tensor([2])
    slots.commit(0, rows, torch.ones(1, 2, 2), torch.ones(1, 2, 1), new_table, new_count, new_row)
    assert routed.w13_weight[2].eq(1).all() and routed.w13_weight[:2].eq(0).all()
    assert routing.replica_count.tolist() == [1, 2, 2, 1] and slots.phy2log[0].tolist() == new_row.tolist()
