"""The Ascend adapter's EPLB tests: vllm-ascend 0.23.0.post1's `eplb_utils` and `ascend_config`,
imported from its sdist (both load without NPU libraries). The one NPU call on their path,
`Tensor.npu()` on the `log2phy` row, is a stand-in that keeps the tensor on the CPU. Stand-in layers:
tests/eplb/ascend/standins.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def vllm_ascend_eplb(vllm_ascend_on_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    import vllm_ascend.ascend_config as ascend_config
    import vllm_ascend.eplb.core.eplb_utils as eplb_utils

    monkeypatch.setattr(torch.Tensor, "npu", lambda self: self, raising=False)
    return SimpleNamespace(utils=eplb_utils, EplbConfig=ascend_config.EplbConfig)
