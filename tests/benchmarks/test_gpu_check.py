"""benchmarks/gpu_check.py refuses to run without CUDA, with a message saying why (exit status 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available: the check would run")
def test_without_cuda_it_exits_2_and_says_why() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "CUDA is not available" in done.stderr
