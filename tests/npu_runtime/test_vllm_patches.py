"""npu_runtime.vllm_patches: every patch fits the installed vLLM, and a symbol broken on purpose makes
the feature that needs it refuse to start with the vLLM version and the symbol in the error."""

from __future__ import annotations

import inspect

import pytest

from npu_runtime import vllm_patches
from npu_runtime.vllm_patches import EXACT, HAS, PREFIX, VllmPatchError, compare_params


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch):
    """A process state with no check run and nothing installed (the real one is restored after)."""
    monkeypatch.setattr(vllm_patches, "_STATE", vllm_patches._State())
    return vllm_patches


def test_every_patch_fits_the_installed_vllm(fresh) -> None:
    problems = {c.patch.symbol: c.problem for c in fresh.checks() if c.problem is not None}
    assert problems == {}
    rep = fresh.report()
    assert rep["refused"] == [] and len(rep["patches"]) == len(fresh.PATCHES)
    assert fresh.summary().startswith(f"vLLM {fresh.vllm_version()}: all ")


def test_every_feature_has_patches_and_every_patch_a_known_feature() -> None:
    assert {p.feature for p in vllm_patches.PATCHES} == set(vllm_patches.FEATURES)
    assert len({p.symbol for p in vllm_patches.PATCHES}) == len(vllm_patches.PATCHES)


@pytest.mark.parametrize(
    ("expected", "actual", "match", "fits"),
    [
        (("self", "x"), ["self", "x"], EXACT, True),
        (("self", "x"), ["self", "x", "y"], EXACT, False),
        (("self", "x"), ["self", "y"], EXACT, False),
        (("self", "x"), ["self", "x", "y"], PREFIX, True),
        (("self", "x"), ["x", "self"], PREFIX, False),
        (("a", "c"), ["a", "b", "c"], HAS, True),
        (("a", "d"), ["a", "b", "c"], HAS, False),
    ],
)
def test_compare_params(expected, actual, match, fits) -> None:
    assert (compare_params(expected, actual, match) is None) is fits


def test_install_patches_once_and_the_checks_still_see_the_original(fresh) -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.engine.core import DPEngineCoreProc
    from vllm.v1.worker import dp_utils

    assert fresh.install(["eplb", "balance"]) == []
    hooked = (BaseRouter._apply_eplb_mapping, dp_utils._run_ar, DPEngineCoreProc._has_global_unfinished_reqs)
    assert all(getattr(fn, "_dpserve", False) for fn in hooked)
    assert fresh.installed() == {"eplb", "balance"}
    fresh._STATE.installed.clear()  # a second install in the same process must not wrap twice
    assert fresh.install(["eplb", "balance"]) == []
    assert (
        BaseRouter._apply_eplb_mapping,
        dp_utils._run_ar,
        DPEngineCoreProc._has_global_unfinished_reqs,
    ) == hooked
    assert list(inspect.signature(dp_utils._run_ar).parameters)[0] == "should_ubatch"
    assert all(c.problem is None for c in fresh.checks(["eplb", "balance"], refresh=True))
    applied = {c.patch.symbol for c in fresh.checks(["eplb"]) if c.applied}
    assert "vllm.v1.worker.dp_utils._run_ar" in applied


def test_a_missing_symbol_refuses_eplb_with_version_and_symbol(fresh, monkeypatch) -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.worker import dp_utils

    monkeypatch.delattr(BaseRouter, "_apply_eplb_mapping")
    run_ar = dp_utils._run_ar
    assert fresh.install(["eplb"]) == ["eplb"]
    assert dp_utils._run_ar is run_ar, "a refused feature gets no patch at all"
    with pytest.raises(VllmPatchError) as err:
        fresh.require("eplb")
    msg = str(err.value)
    assert fresh.vllm_version() in msg
    assert "BaseRouter._apply_eplb_mapping does not exist" in msg
    assert fresh.report()["refused"] == ["eplb"]
    assert fresh.summary().endswith("refused eplb")


def test_a_changed_signature_refuses_the_balance_scheduler(fresh, monkeypatch) -> None:
    from vllm.v1.engine.core import DPEngineCoreProc

    from scheduler.balance_scheduler import BalanceScheduler

    def _has_global_unfinished_reqs(self, local_unfinished, wave):  # a vLLM that grew a parameter
        return local_unfinished

    monkeypatch.setattr(DPEngineCoreProc, "_has_global_unfinished_reqs", _has_global_unfinished_reqs)
    with pytest.raises(VllmPatchError, match=r"balance scheduler on vLLM .*_has_global_unfinished_reqs "
                                             r"parameters \['self', 'local_unfinished', 'wave'\]"):  # fmt: skip
        BalanceScheduler()  # refused before vLLM's Scheduler is even built
    assert DPEngineCoreProc._has_global_unfinished_reqs is _has_global_unfinished_reqs


def test_eplb_applier_refuses_to_start_on_a_broken_symbol(fresh, monkeypatch) -> None:
    from vllm.v1.worker import dp_utils

    from eplb.agreement import EplbWorkerState

    def _run_ar(should_ubatch, num_tokens, parallel_config):
        raise AssertionError("never called")

    monkeypatch.setattr(dp_utils, "_run_ar", _run_ar)
    with pytest.raises(VllmPatchError, match=r"online expert load balancing \(EPLB\) on vLLM .*_run_ar"):
        EplbWorkerState.from_worker(worker=None, num_redundant=1)


def test_eplb_applier_refuses_without_the_plugin(fresh) -> None:
    from eplb.agreement import EplbWorkerState

    with pytest.raises(VllmPatchError, match="did not run in this worker"):
        EplbWorkerState.from_worker(worker=None, num_redundant=1)


def test_the_rank_refuses_cpu_expert_parallelism_on_a_broken_kernel(fresh, monkeypatch) -> None:
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    def apply(self, output, hidden_states, w1, w2, topk_ids, topk_weights, *args):  # ids and weights swapped
        raise AssertionError("never called")

    monkeypatch.setattr(cpu_moe.CPUUnquantizedExperts, "apply", apply)
    dp_only = {"data_parallel_size": 2}
    fresh.require_for_engine(dp_only, "cpu")  # data parallelism alone needs no kernel patch
    fresh.require_for_engine(dp_only | {"enable_expert_parallel": True}, "cuda")
    with pytest.raises(
        VllmPatchError, match=r"expert parallelism on CPU on vLLM .*CPUUnquantizedExperts\.apply"
    ):
        fresh.require_for_engine(dp_only | {"enable_expert_parallel": True}, "cpu")


def test_features_for_engine() -> None:
    args = {
        "data_parallel_size": 2,
        "enable_expert_parallel": True,
        "worker_extension_cls": "eplb.applier.EplbWorkerExtension",
        "scheduler_cls": "scheduler.balance_scheduler.BalanceAutoScheduler",
    }
    assert vllm_patches.features_for_engine(args, "cpu") == [
        "rank_stats",
        "cpu_dp",
        "cpu_ep",
        "eplb",
        "balance",
    ]
    # On Ascend, EPLB uses vllm-ascend's symbols (npu_runtime.ascend_patches), not these.
    assert vllm_patches.features_for_engine(args, "npu") == ["rank_stats", "balance"]
    assert vllm_patches.features_for_engine({}, "cpu") == ["rank_stats"]


def test_unknown_feature_is_an_error() -> None:
    with pytest.raises(KeyError):
        vllm_patches.require("no_such_feature")


def test_the_rank_refuses_to_start_an_engine_its_vllm_cannot_carry(
    fresh, monkeypatch, tiny_model_dir
) -> None:
    import asyncio
    import os

    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    from deployments.rank import DPRank

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the rank sets its environment in-process
    monkeypatch.delattr(cpu_moe.CPUUnquantizedExperts, "apply")
    settings = {"model": tiny_model_dir, "data_parallel_size": 2, "enable_expert_parallel": True,
                "max_model_len": 256, "max_num_seqs": 8}  # fmt: skip
    rank = DPRank(settings, rank=0, platform_name="cpu")
    with pytest.raises(VllmPatchError, match=r"refuses expert parallelism on CPU on vLLM .*cpu_moe\."
                                             r"CPUUnquantizedExperts\.apply is not defined on CPUUnquantizedExperts itself"):  # fmt: skip
        asyncio.run(rank.start("127.0.0.1", 1))
    assert rank.engine is None and not rank.get_stats()["ready"]


def test_patched_run_ar_carries_participant_rows(fresh, monkeypatch) -> None:
    import types

    import torch
    import torch.distributed as dist
    from vllm.v1.worker import dp_utils

    from npu_runtime import eplb_hooks

    class Participant:
        num_rows = 2

        def __init__(self) -> None:
            self.sums: list[int] = []

        def contribute(self) -> list[int]:
            return [7]  # one value short: the missing row is sent as 0

        def on_sums(self, sums: list[int], dp_size: int) -> None:
            self.sums = sums

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:

        def _get_device_and_group(parallel_config):  # the one-process gloo group (vLLM's own: its DP group)
            return torch.device("cpu"), dist.group.WORLD

        monkeypatch.setattr(dp_utils, "_get_device_and_group", _get_device_and_group)
        assert fresh.install(["eplb"]) == []
        config = types.SimpleNamespace(data_parallel_size=1, data_parallel_rank=0)
        p = Participant()
        eplb_hooks.register_step_sync(p)
        before = eplb_hooks.dp_steps()
        try:
            out = dp_utils._run_ar(True, 5, 8, 2, config)
        finally:
            eplb_hooks.unregister_step_sync(p)
        assert out.flatten().tolist() == [5, 8, 1, 2]  # vLLM's four rows, as its caller reads them
        assert p.sums == [7, 0]
        assert eplb_hooks.dp_steps() == before + 1
    finally:
        if started:
            dist.destroy_process_group()
