"""Engine arguments for EPLB on Ascend (eplb.ascend.startup): the rank writes the start-up expert map
from the model's config and passes it in vllm-ascend's `eplb_config`, which vllm-ascend 0.23.0.post1's
EplbConfig (imported from its sdist) accepts; features are checked by the Ascend symbol set."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from eplb.ascend.startup import ep_size_of, with_startup_slots
from npu_runtime import ascend_patches

ARGS = {"model": "unused", "data_parallel_size": 2, "tensor_parallel_size": 1, "enable_expert_parallel": True,
        "worker_extension_cls": "eplb.applier.EplbWorkerExtension", "additional_config": {"other": 1}}  # fmt: skip


def test_engine_args_gain_the_expert_map(vllm_ascend_eplb: SimpleNamespace, tmp_path: Path,
                                         tiny_model_dir: str) -> None:  # fmt: skip
    args = dict(ARGS, model=tiny_model_dir)  # the tiny MoE model's config: 16 experts, 4 layers
    out = with_startup_slots(args, 2, tmp_path / "map.json", device="A3")  # A3: no AllGather under EP
    assert out["additional_config"]["other"] == 1 and args["additional_config"] == {"other": 1}
    cfg = vllm_ascend_eplb.EplbConfig(out["additional_config"]["eplb_config"])
    assert cfg.dynamic_eplb is False and cfg.num_redundant_experts == 0  # slots come from the file
    data = json.loads(Path(cfg.expert_map_path).read_text())
    assert data["moe_layer_count"] == 4 and len(data["layer_list"][0]["device_list"]) == 2
    assert [len(d["device_expert"]) for d in data["layer_list"][0]["device_list"]] == [9, 9]


def test_refused_without_expert_parallelism_or_with_an_eplb_config(tmp_path: Path) -> None:
    hf = SimpleNamespace(num_experts=8, num_hidden_layers=2)
    assert ep_size_of(ARGS) == 2 and ep_size_of(dict(ARGS, enable_expert_parallel=False)) == 1
    with pytest.raises(ValueError, match="expert parallelism"):
        with_startup_slots(dict(ARGS, enable_expert_parallel=False), 2, tmp_path / "m.json", hf)
    with pytest.raises(ValueError, match="eplb_config is set"):
        with_startup_slots(dict(ARGS, additional_config={"eplb_config": {}}), 2, tmp_path / "m.json", hf)


def test_ascend_features_of_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(ARGS, scheduler_cls="scheduler.balance_scheduler.BalanceAutoScheduler")
    assert ascend_patches.features_for_engine(args) == ["ascend_eplb", "ascend_balance"]
    assert ascend_patches.features_for_engine({}) == []
    ascend_patches.require_for_engine({})  # nothing asked: nothing refused
    # Without vllm-ascend (as in this environment outside these tests' sdist): refused, naming why.
    monkeypatch.setattr(ascend_patches, "_STATE", ascend_patches._State())
    monkeypatch.setattr(ascend_patches, "source_root", lambda: None)
    with pytest.raises(ascend_patches.AscendPatchError, match="vllm_ascend is not importable"):
        ascend_patches.require_for_engine(args)
