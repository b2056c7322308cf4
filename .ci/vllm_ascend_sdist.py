"""Fetch vllm-ascend 0.23.0.post1's sdist into the dpserve cache and print its unpacked source root.

The Ascend adapter's tests (tests/npu_runtime/ascend, tests/eplb/ascend) read vllm-ascend's Python
sources from here: by import where a module loads without NPU libraries, by source otherwise.

Why pip with these options: vllm-ascend ships only an sdist, and pip prepares its metadata before it
saves the file. Its setup.py refuses to run without `SOC_VERSION` (any chip name does for metadata),
and build isolation would build its build requirements (cmake, numpy, ...) from source under
`--no-binary :all:`; without isolation it needs only setuptools-scm, which the `test` extra installs.
The file is checked against the sha256 recorded here, so a changed upload fails loudly.

    python .ci/vllm_ascend_sdist.py            # prints e.g. ~/.cache/dpserve/vllm_ascend-0.23.0.post1
    DPSERVE_CACHE=/some/dir python .ci/vllm_ascend_sdist.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.23.0.post1"
SHA256 = "a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1"
NAME = f"vllm_ascend-{VERSION}"


def cache_dir() -> Path:
    return Path(os.environ.get("DPSERVE_CACHE") or Path.home() / ".cache" / "dpserve")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(cache: Path | None = None) -> Path:
    """The unpacked source root (holding `vllm_ascend/`), downloading and unpacking it when absent.
    Raises RuntimeError with pip's output when the download fails or the file's hash differs."""
    cache = cache or cache_dir()
    root = cache / NAME
    if (root / "vllm_ascend" / "__init__.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"{NAME}.tar.gz"
    if not tarball.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"vllm-ascend=={VERSION}", "-d", str(cache)]  # fmt: skip
        env = {**os.environ, "SOC_VERSION": os.environ.get("SOC_VERSION", "ascend910b1")}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not tarball.is_file():
            raise RuntimeError(f"pip download of vllm-ascend {VERSION} failed ({' '.join(cmd)}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")  # fmt: skip
    digest = sha256(tarball)
    if digest != SHA256:
        raise RuntimeError(f"{tarball}: sha256 {digest}, expected {SHA256}")
    tmp = cache / f".{NAME}.partial-{os.getpid()}"
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    try:
        os.replace(tmp / NAME, root)  # atomic: a concurrent run sees a whole tree or none
    except OSError:  # another run unpacked it first
        if not (root / "vllm_ascend" / "__init__.py").is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    print(fetch())
