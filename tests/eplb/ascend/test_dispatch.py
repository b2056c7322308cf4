"""vllm-ascend's AllGather dispatch with redundant slots (eplb.ascend.dispatch), against vllm-ascend
0.23.0.post1's sdist: its sources still do what the refusal says (the dispatcher masks with the [E]
logical map indexed by physical ids; each rank maps gathered tokens through its own replica choice),
its own tables show both defects, our "can a step pick AllGather?" rule agrees with its own
`select_moe_comm_method` (run here on stand-ins for the NPU queries), and EPLB with redundant slots is
refused at start-up where AllGather can run."""

from __future__ import annotations

import ast
import itertools
import logging
import shutil
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from eplb.ascend.dispatch import (
    allgather_reachable,
    device_type,
    mc2_capacity,
    refuse_allgather_with_redundant,
)
from eplb.ascend.placement import startup_phy2log, write_expert_map
from eplb.ascend.startup import with_startup_slots
from npu_runtime import ascend_patches
from npu_runtime.ascend_patches import AscendPatchError
from tests.eplb.ascend.standins import standin_layers

E, EP, R = 8, 2, 2  # spr = 5: rank 0 holds experts [0, 1, 2, 3, 4], rank 1 [4, 5, 6, 7, 0]
ARGS = {"model": "unused", "data_parallel_size": 2, "tensor_parallel_size": 1, "enable_expert_parallel": True,
        "worker_extension_cls": "eplb.applier.EplbWorkerExtension"}  # fmt: skip
HF = SimpleNamespace(num_experts=E, num_hidden_layers=2, num_experts_per_tok=2)


def _node(tree: ast.Module, *qualname: str) -> ast.AST:
    node: Any = tree
    for name in qualname:
        node = next(n for n in node.body if getattr(n, "name", None) == name)
    return node


def _tree(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / "vllm_ascend" / rel).read_text())


def test_the_sources_still_read_as_the_refusal_says(vllm_ascend_root: Path) -> None:
    fused = _node(
        _tree(vllm_ascend_root, "ops/fused_moe/moe_comm_method.py"), "MoECommMethod", "fused_experts"
    )
    src = ast.unparse(fused)
    # log2phy turns logical ids into physical ones before the dispatcher sees them.
    assert src.index("routing.log2phy[routed_topk_ids]") < src.index("token_dispatch(")
    dispatch = _node(_tree(vllm_ascend_root, "ops/fused_moe/token_dispatcher.py"), "TokenDispatcherWithAllGather",
                     "token_dispatch")  # fmt: skip
    src = ast.unparse(dispatch)
    assert "expert_map = token_dispatch_input.routing.expert_map" in src
    assert "mask = expert_map[topk_ids] != -1" in src
    assert "global_num_experts = len(expert_map) + global_redundant_expert_num" in src  # [E], not [E + R]
    # AllGather gathers the router logits of every DP rank before routing: every rank routes every token.
    prepare = _node(_tree(vllm_ascend_root, "ops/fused_moe/prepare_finalize.py"),
                    "PrepareAndFinalizeWithAllGather", "_prepare_with_dp_group")  # fmt: skip
    assert "router_logits = self.moe_config.dp_group.all_gather(router_logits, 0)" in ast.unparse(prepare)
    # Both MoE layers pass the layer's _expert_map as routing.expert_map.
    for rel in ("ops/fused_moe/fused_moe.py", "ops/fused_moe/fused_moe_0_23_0.py"):
        assert "expert_map=self._expert_map" in (vllm_ascend_root / "vllm_ascend" / rel).read_text()


def test_vllm_ascends_own_tables_show_both_defects(vllm_ascend_eplb: SimpleNamespace, tmp_path: Path) -> None:
    phy2log = startup_phy2log(1, E, EP, R)
    path = write_expert_map(tmp_path / "map.json", phy2log, EP)
    ranks = [standin_layers(vllm_ascend_eplb, path, phy2log, EP, ep_rank=q)[0] for q in range(EP)]
    spr = (E + R) // EP
    physical = torch.stack([m.log2phy.to(torch.int64) for m in ranks])  # [EP, E]: each rank's choice
    assert all(len(m._expert_map) == E for m in ranks)
    # 1. The dispatcher's mask indexes the [E] map with physical ids up to E + R - 1.
    assert int(physical.max()) >= E
    with pytest.raises(IndexError):
        _ = ranks[1]._expert_map[physical[1]] != -1  # the dispatcher's statement, on rank 1's routing
    # 2. With every token on every rank, the ranks that compute logical expert e are those whose own
    # choice for e is one of their slots: two for expert 4 (slots 4 and 5), not one.
    computes = torch.stack([(physical[q] // spr) == q for q in range(EP)]).sum(0)
    assert int(computes[4]) == 2 and sorted(set(computes.tolist())) == [1, 2]


class _Stand:
    """The NPU-side queries vllm-ascend's selection makes, answered from fields."""

    def __init__(self, device: str, ep: int, capacity: int) -> None:
        self.device, self.ep, self.capacity = device, ep, capacity


@pytest.fixture(scope="module")
def their_selection(vllm_ascend_root: Path):
    """vllm-ascend's `select_moe_comm_method` and helpers, compiled from its source with stand-ins for
    the device type, EP group, MC2 capacity and config (ascend_forward_context imports torch_npu)."""
    ctx = _tree(vllm_ascend_root, "ascend_forward_context.py")
    utils = _tree(vllm_ascend_root, "utils.py")
    names = ("MoECommType", "_select_a2_moe_comm_method", "_select_a3_moe_comm_method",
             "_select_a5_moe_comm_method", "select_moe_comm_method")  # fmt: skip
    module = ast.Module(
        body=[_node(utils, "AscendDeviceType")] + [_node(ctx, n) for n in names], type_ignores=[]
    )
    stand = _Stand("A2", 2, 16)
    ns: dict[str, Any] = {
        "Enum": Enum, "VllmConfig": object, "logger": logging.getLogger("vllm_ascend_standin"),
        "is_moe_model": lambda cfg: True, "get_mc2_tokens_capacity": lambda: stand.capacity,
        "get_ascend_config": lambda: SimpleNamespace(enable_fused_mc2=0),
        "speculative_enable_dispatch_gmm_combine_decode": lambda cfg: False,
        "get_ep_group": lambda: SimpleNamespace(world_size=stand.ep),
    }  # fmt: skip
    exec(compile(module, "vllm_ascend/ascend_forward_context.py", "exec"), ns)
    ns["get_ascend_device_type"] = lambda: ns["AscendDeviceType"][stand.device]
    return ns, stand


GRID = list(itertools.product(
    ("A2", "A3", "A5", "_310P"),  # chip
    (1, 2, 16),  # DP (EP ranks, TP 1)
    (2, 384, 512),  # routed experts: 384 is 24 per rank at 16 ranks, MC2's limit on A2
    (1, 8),  # top-k
    (16, 64),  # MC2 capacity
    (8, 64, 100),  # largest step
))  # fmt: skip


@pytest.mark.parametrize("ep_on", [True, False])
def test_rule_agrees_with_vllm_ascends_selection(their_selection, ep_on: bool) -> None:
    ns, stand = their_selection
    allgather = ns["MoECommType"].ALLGATHER
    for device, dp, experts, top_k, capacity, largest in GRID:
        stand.device, stand.ep, stand.capacity = device, dp if ep_on else 1, capacity
        cfg = SimpleNamespace(
            model_config=SimpleNamespace(get_num_experts=lambda n=experts: n,
                                         hf_text_config=SimpleNamespace(num_experts_per_tok=top_k)),
            parallel_config=SimpleNamespace(enable_expert_parallel=ep_on, world_size_across_dp=dp,
                                            pipeline_parallel_size=1),
        )  # fmt: skip
        theirs = any(ns["select_moe_comm_method"](n, cfg) == allgather for n in range(1, largest + 1))
        ours = allgather_reachable(device, ep_size=dp if ep_on else 1, world_size=dp, num_experts=experts,
                                   top_k=top_k, mc2_capacity=capacity, max_step_tokens=largest)  # fmt: skip
        assert ours == theirs, (device, dp, experts, top_k, capacity, largest, ep_on)
        if theirs:  # an unknown capacity or step size never hides an AllGather step
            assert allgather_reachable(device, ep_size=dp if ep_on else 1, world_size=dp, num_experts=experts,
                                       top_k=top_k, mc2_capacity=None, max_step_tokens=None)  # fmt: skip


def test_mc2_capacity_is_known_only_with_prefill_mc2() -> None:
    assert mc2_capacity(1, 2048, enable_prefill_mc2=False) is None
    assert mc2_capacity(2, 300, enable_prefill_mc2=True) == 300
    assert mc2_capacity(2, 4096, enable_prefill_mc2=True) == 1024  # 512 tokens per TP rank at most


def test_redundant_slots_are_refused_where_allgather_can_run(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    with pytest.raises(AscendPatchError) as refused:
        with_startup_slots(ARGS, R, path, HF, device="A2")  # 910B, 2 EP ranks: AllGather in every step
    message = str(refused.value)
    for part in ("vllm-ascend", "A2", "TokenDispatcherWithAllGather", "MoECommType.ALLGATHER",
                 f"eplb.num_redundant={R}", "eplb.num_redundant: 0"):  # fmt: skip
        assert part in message, part
    assert not path.exists()  # refused before anything is written
    for device in ("_310P", "A5"):  # A5: 2 ranks <= top-k 2, steps beyond an unknown capacity
        with pytest.raises(AscendPatchError, match="picks AllGather"):
            with_startup_slots(ARGS, R, path, HF, device=device)
    # Where it cannot run, or without replicas, the slots are set up.
    assert with_startup_slots(ARGS, R, path, HF, device="A3")["additional_config"]["eplb_config"]
    assert with_startup_slots(ARGS, 0, path, HF, device="A2")["additional_config"]["eplb_config"]
    many = dict(
        ARGS,
        data_parallel_size=16,
        max_num_batched_tokens=512,
        additional_config={"enable_prefill_mc2": True},
    )
    hf16 = SimpleNamespace(num_experts=64, num_hidden_layers=2, num_experts_per_tok=2)
    assert with_startup_slots(many, 16, path, hf16, device="A2")["additional_config"][
        "eplb_config"
    ]  # MC2 only
    with pytest.raises(AscendPatchError, match="picks AllGather"):  # a step over the capacity: AllGather
        with_startup_slots(dict(many, max_num_batched_tokens=8192), 16, path, hf16, device="A2")


def test_the_chip_is_read_from_the_installed_build_info(vllm_ascend_root: Path, tmp_path: Path) -> None:
    # The sdist has no _build_info.py (its setup.py writes one when it builds): the chip is unknown,
    # and EPLB with redundant slots is refused, naming why.
    assert device_type(vllm_ascend_root) is None

    with pytest.raises(AscendPatchError, match="cannot read which chip"):
        refuse_allgather_with_redundant(ARGS, R, E, 2, root=vllm_ascend_root)
    root = tmp_path / "site"
    shutil.copytree(vllm_ascend_root / "vllm_ascend", root / "vllm_ascend",
                    ignore=lambda d, names: [n for n in names if n not in ("__init__.py", "_version.py")])  # fmt: skip
    info = root / "vllm_ascend" / "_build_info.py"
    info.write_text("# Auto-generated file\n__device_type__ = 'A3'\n")
    assert device_type(root) == "A3"
    info.write_text("__soc_version__ = 'ascend310p1'\n")  # older builds: the chip from the SoC
    assert device_type(root) == "_310P"
    assert ascend_patches.version(root) == "0.23.0.post1"
    info.write_text("__device_type__ = 'A2'\n")
    with pytest.raises(AscendPatchError, match=r"on vllm-ascend 0\.23\.0\.post1, built for A2"):
        refuse_allgather_with_redundant(ARGS, R, E, 2, root=root)
    info.write_text("__device_type__ = 'A3'\n")
    refuse_allgather_with_redundant(ARGS, R, E, 2, root=root)  # A3 under EP: no AllGather step
