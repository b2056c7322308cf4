"""Fixtures for the Ascend adapter's tests: vllm-ascend 0.23.0.post1's sources, from its sdist.

`vllm_ascend_root` fetches the sdist into the dpserve cache once per machine (.ci/vllm_ascend_sdist.py,
`make vllm-ascend-src`) and yields the unpacked source root. A failed download fails the tests that
need it, loudly (CI must not go green without them); `DPSERVE_SKIP_ASCEND_SDIST=1` turns that into a
skip with the reason, for machines without access to the package index.

`vllm_ascend_on_path` also makes `vllm_ascend` importable in this process, for the modules that load
without NPU libraries. vLLM picks its platform by trying to import `vllm_ascend`, so the platform is
resolved (CPU here) before the path is added, and the path and every `vllm_ascend` module are removed
again after the module's tests.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "vllm_ascend_sdist.py"
SKIP_ENV = "DPSERVE_SKIP_ASCEND_SDIST"


def _sdist_module():
    spec = importlib.util.spec_from_file_location("vllm_ascend_sdist", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="session")
def vllm_ascend_root() -> Path:
    """vllm-ascend 0.23.0.post1's unpacked source root (holding `vllm_ascend/`)."""
    try:
        return _sdist_module().fetch()
    except Exception as exc:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"vllm-ascend sdist unavailable ({SKIP_ENV}=1): {exc}")
        pytest.fail(f"vllm-ascend sdist unavailable (set {SKIP_ENV}=1 to skip instead): {exc}")


@pytest.fixture(scope="module")
def vllm_ascend_on_path(vllm_ascend_root: Path) -> Iterator[Path]:
    """`vllm_ascend` importable from the sdist for this test module (CPU platform kept)."""
    from vllm.platforms import current_platform

    assert current_platform.device_type == "cpu"  # resolved before vllm_ascend can be found
    root = str(vllm_ascend_root)
    sys.path.insert(0, root)
    try:
        yield vllm_ascend_root
    finally:
        sys.path.remove(root)
        for name in [n for n in sys.modules if n == "vllm_ascend" or n.startswith("vllm_ascend.")]:
            del sys.modules[name]
