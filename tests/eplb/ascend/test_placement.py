"""Placement tables of the Ascend adapter (eplb.ascend.placement) against vllm-ascend 0.23.0.post1's
own start-up code, imported from its sdist: our expert map file allocates the slots we expect, and
our per-rank `log2phy` rows are the ones vllm-ascend computes, for start-up and later placements."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eplb.ascend.placement import (
    distinct_per_rank,
    eplb_additional_config,
    expert_map_file,
    moe_shape,
    phy2log_from_expert_maps,
    rank_log2phy,
    startup_additional_config,
    startup_phy2log,
    write_expert_map,
)
from eplb.slots import layer_tables
from tests.eplb.ascend.standins import standin_layers


def test_startup_placement_holds_every_expert_and_no_rank_twice() -> None:
    p = startup_phy2log(3, 8, 2, 2)
    assert p.shape == (3, 10) and (p == p[0]).all()
    assert p[0].tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 0]
    assert set(p[0]) == set(range(8)) and distinct_per_rank(p, 2)
    assert not distinct_per_rank(np.array([[0, 0, 1, 2]]), 2)
    with pytest.raises(ValueError, match="divide"):
        startup_phy2log(1, 8, 3, 0)
    with pytest.raises(ValueError, match="distinct"):
        startup_phy2log(1, 4, 2, 6)


def test_expert_map_file_refuses_a_rank_holding_an_expert_twice(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice"):
        expert_map_file(np.array([[0, 0, 1, 2]]), 2)
    with pytest.raises(ValueError, match=".json"):
        write_expert_map(tmp_path / "map.txt", startup_phy2log(1, 4, 2, 0), 2)


@pytest.mark.parametrize(("num_logical", "ep_size", "num_redundant"), [(8, 2, 2), (16, 4, 4), (6, 3, 0)])
def test_vllm_ascend_reads_our_expert_map(vllm_ascend_eplb: SimpleNamespace, tmp_path: Path, num_logical: int,
                                          ep_size: int, num_redundant: int) -> None:  # fmt: skip
    phy2log = startup_phy2log(2, num_logical, ep_size, num_redundant)
    path = write_expert_map(tmp_path / "map.json", phy2log, ep_size, layer_count=3)
    assert json.loads(path.read_text())["moe_layer_count"] == 3
    spr = (num_logical + num_redundant) // ep_size
    for layer in range(3):  # a layer past phy2log's repeats its last row
        placement, physical = vllm_ascend_eplb.utils.expert_file_to_tensor(str(path), layer)
        assert physical == num_logical + num_redundant
        assert placement.tolist() == phy2log[min(layer, 1)].reshape(ep_size, spr).tolist()
    # vllm-ascend's config accepts what we pass it (and keeps its dynamic EPLB off).
    cfg = vllm_ascend_eplb.EplbConfig(eplb_additional_config(path)["eplb_config"])
    assert cfg.expert_map_path == str(path) and cfg.dynamic_eplb is False


@pytest.mark.parametrize("tp_size", [1, 2])
def test_our_start_up_tables_are_vllm_ascends(
    vllm_ascend_eplb: SimpleNamespace, tmp_path: Path, tp_size: int
) -> None:
    num_logical, ep_size, num_redundant = 16, 4, 8
    phy2log = startup_phy2log(2, num_logical, ep_size, num_redundant)
    path = write_expert_map(tmp_path / "map.json", phy2log, ep_size)
    for ep_rank in range(ep_size):
        for layer in standin_layers(vllm_ascend_eplb, path, phy2log, ep_size, ep_rank, tp_size):
            row = phy2log[layer.moe_instance_id]
            assert layer.global_redundant_expert_num == num_redundant
            assert phy2log_from_expert_maps(
                layer.global_expert_map.numpy(), layer.local_num_experts
            ).tolist() == (row.tolist())
            table, rc = layer_tables(row, num_logical, num_redundant + 1)
            assert torch.equal(rank_log2phy(table, rc, ep_rank, tp_size), layer.log2phy), (ep_rank, tp_size)


def _expert_maps(row: np.ndarray, ep_size: int, num_logical: int) -> torch.Tensor:
    """vllm-ascend's global_expert_map int32 [ep_size, E] of a placement with distinct experts per rank."""
    spr = len(row) // ep_size
    gmap = torch.full((ep_size, num_logical), -1, dtype=torch.int32)
    for q in range(ep_size):
        gmap[q, torch.as_tensor(row[q * spr : (q + 1) * spr])] = torch.arange(spr, dtype=torch.int32)
    return gmap


@pytest.mark.parametrize("tp_size", [1, 2])
def test_plan_tables_are_vllm_ascends_for_random_placements(
    vllm_ascend_eplb: SimpleNamespace, tp_size: int
) -> None:
    rng = np.random.default_rng(7)
    num_logical, ep_size, spr = 12, 4, 5
    for _ in range(20):
        # Each rank holds spr distinct experts; every expert somewhere (what vllm-ascend can express).
        while True:
            row = np.concatenate([rng.choice(num_logical, spr, replace=False) for _ in range(ep_size)])
            if len(set(row.tolist())) == num_logical:
                break
        table, rc = layer_tables(row, num_logical, ep_size * spr - num_logical + 1)
        gmap = _expert_maps(row, ep_size, num_logical)
        for ep_rank in range(ep_size):
            theirs = vllm_ascend_eplb.utils.generate_log2phy_map(gmap, ep_rank, tp_size=tp_size)
            assert torch.equal(rank_log2phy(table, rc, ep_rank, tp_size), theirs), (row.tolist(), ep_rank)


def test_log2phy_rows_route_to_slots_holding_the_expert() -> None:
    # Plans may hold an expert twice on one rank (not expressible in vllm-ascend's file): our rows
    # still name a slot holding the expert, on every rank.
    row = np.array([0, 0, 1, 2, 3, 3, 1, 2])
    table, rc = layer_tables(row, 4, 5)
    for ep_rank in range(4):
        got = rank_log2phy(table, rc, ep_rank).tolist()
        assert [int(row[s]) for s in got] == [0, 1, 2, 3]


def test_start_up_config_from_a_model_config(vllm_ascend_eplb: SimpleNamespace, tmp_path: Path) -> None:
    deepseek = SimpleNamespace(n_routed_experts=16, num_hidden_layers=3, num_nextn_predict_layers=1)
    qwen = SimpleNamespace(text_config=SimpleNamespace(num_experts=8, num_hidden_layers=2))
    assert moe_shape(deepseek) == (16, 4) and moe_shape(qwen) == (8, 2)
    with pytest.raises(ValueError, match="routed experts"):
        moe_shape(SimpleNamespace(num_hidden_layers=2))
    extra = startup_additional_config(tmp_path / "map.json", deepseek, ep_size=4, num_redundant=4)
    cfg = vllm_ascend_eplb.EplbConfig(extra["eplb_config"])
    # The MTP layer (id 4 = the file's count) takes layer 0's devices, as vllm-ascend reads it.
    assert vllm_ascend_eplb.utils.expert_file_to_tensor(cfg.expert_map_path, 4) == (None, 20)
    placement, physical = vllm_ascend_eplb.utils.expert_file_to_tensor(cfg.expert_map_path, 3)
    assert physical == 20 and placement.tolist() == startup_phy2log(1, 16, 4, 4)[0].reshape(4, 5).tolist()
