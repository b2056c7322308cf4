"""What dpserve carries on each supported vLLM: the features npu_runtime.vllm_patches refuses there.

Runs in the main environment (vLLM 0.32) and in `make test-vllm023`'s (vLLM 0.23, the vLLM that
vllm-ascend 0.23 runs). A vLLM whose symbols moved changes the refused set and fails here.
"""

from __future__ import annotations

import pytest

from npu_runtime import vllm_patches

# vLLM 0.23's CPU MoE kernel has no CPUUnquantizedExperts (routing inside CPUFusedMOE ignores
# expert_map) and its MoERunner has no routed_experts: CPU EP and the EPLB applier's surgery do not fit.
REFUSED = {"0.32": [], "0.23": ["cpu_ep", "eplb"]}


def _minor() -> str:
    return ".".join(vllm_patches.vllm_version().split(".")[:2])


def test_refused_features_are_the_expected_ones() -> None:
    if _minor() not in REFUSED:
        pytest.fail(f"vLLM {vllm_patches.vllm_version()} is not a supported version ({sorted(REFUSED)})")
    assert vllm_patches.report()["refused"] == REFUSED[_minor()]


def test_a_refused_feature_names_its_symbols() -> None:
    for feature in REFUSED[_minor()]:
        with pytest.raises(
            vllm_patches.VllmPatchError, match=f"on vLLM {vllm_patches.vllm_version()}: vllm\\."
        ):
            vllm_patches.require(feature)
