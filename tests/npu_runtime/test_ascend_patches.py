"""The Ascend adapter's vllm-ascend symbols (npu_runtime.ascend_patches) against vllm-ascend
0.23.0.post1's sdist: by source for every symbol, by import where the module loads without NPU
libraries; a symbol broken on purpose refuses its feature, naming the symbol and the version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from npu_runtime import ascend_patches as ap


def test_report_without_vllm_ascend_is_empty() -> None:
    # Before any test puts the sdist on the path: this environment (vLLM 0.32 on CPU) has no vllm-ascend installed: nothing to report or refuse.
    assert ap.report() == {"vllm_ascend": None, "refused": [], "symbols": []}
    assert ap.summary() == "vllm-ascend not installed"


def test_every_symbol_fits_by_source(vllm_ascend_root: Path) -> None:
    assert ap.version(vllm_ascend_root) == ap.SUPPORTED
    problems = {c.symbol.symbol: c.problem for c in ap.checks(root=vllm_ascend_root, by_import=False)}
    assert len(problems) == len(ap.SYMBOLS)
    assert {k: v for k, v in problems.items() if v is not None} == {}
    ap.require("ascend_eplb", "ascend_balance", root=vllm_ascend_root)


def test_modules_that_load_without_npu_are_checked_by_import(vllm_ascend_on_path: Path) -> None:
    every = ap.checks(root=vllm_ascend_on_path, by_import=True)
    assert [c.as_dict() for c in every if c.problem is not None] == []
    by_import = {c.symbol.module for c in every if c.way == "import"}
    # These load on a CPU-only machine; the MoE layer, workers and scheduler patch need torch_npu.
    assert {"vllm_ascend.ascend_config", "vllm_ascend.eplb.core.eplb_utils",
            "vllm_ascend.eplb.adaptor.vllm_adaptor"} <= by_import  # fmt: skip
    assert "vllm_ascend.worker.worker" not in by_import
    assert ap.BALANCE_MODULE not in by_import  # a patch module is read, never imported by a check


def _tree_with(tmp_path: Path, root: Path, module: str, old: str, new: str) -> Path:
    """A copy of vllm-ascend's package with `old` replaced by `new` in one module's source."""
    shutil.copytree(root / "vllm_ascend", tmp_path / "vllm_ascend")
    path = ap.module_file(tmp_path, module)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return tmp_path


def test_a_changed_signature_refuses_the_feature(tmp_path: Path, vllm_ascend_root: Path) -> None:
    module = "vllm_ascend.worker.model_runner_v1"
    tree = _tree_with(
        tmp_path, vllm_ascend_root, module, "allow_dp_padding: bool = False,", "pad: bool = False,"
    )
    with pytest.raises(ap.AscendPatchError) as err:
        ap.require("ascend_eplb", root=tree)
    msg = str(err.value)
    assert f"{module}.NPUModelRunner._sync_metadata_across_dp parameters" in msg
    assert "vllm-ascend 0.23.0.post1" in msg and "online expert load balancing" in msg
    ap.require("ascend_balance", root=tree)  # the other feature is unaffected


def test_a_missing_rebinding_refuses_the_balance_scheduler(tmp_path: Path, vllm_ascend_root: Path) -> None:
    line = "vllm.v1.core.sched.scheduler.Scheduler = BalanceScheduler"
    tree = _tree_with(tmp_path, vllm_ascend_root, ap.BALANCE_MODULE, line, "pass")
    with pytest.raises(
        ap.AscendPatchError, match="is not assigned to vllm.v1.core.sched.scheduler.Scheduler"
    ):
        ap.require("ascend_balance", root=tree)


def test_a_missing_attribute_is_named(tmp_path: Path, vllm_ascend_root: Path) -> None:
    module = "vllm_ascend.ops.fused_moe.fused_moe_0_23_0"
    tree = _tree_with(tmp_path, vllm_ascend_root, module, "self.log2phy", "self.log_to_phy")
    bad = [c for c in ap.checks(["ascend_eplb"], root=tree, by_import=False) if c.problem]
    assert [(c.symbol.qualname, c.problem) for c in bad] == [
        ("AscendFusedMoE", "sets no attribute(s) ['log2phy']")
    ]
