import sys
import types

import pytest

from npu_runtime import platform as plat


@pytest.fixture(autouse=True)
def _fresh_detection(monkeypatch):
    monkeypatch.delenv("DPSERVE_PLATFORM", raising=False)
    plat.detect.cache_clear()
    yield
    plat.detect.cache_clear()


def test_this_machine_is_cpu():
    p = plat.detect()
    assert p.name == "cpu"
    assert (p.device_type, p.ray_resource, p.dist_backend, p.visible_devices_env) == (
        "cpu",
        "CPU",
        "gloo",
        None,
    )
    assert p.vllm_env["VLLM_CPU_KVCACHE_SPACE"]
    assert p.vllm_env["VLLM_HOST_IP"] == "127.0.0.1"


def test_cuda_detected_when_torch_sees_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    p = plat.detect()
    assert (p.name, p.ray_resource, p.dist_backend, p.visible_devices_env) == (
        "cuda",
        "GPU",
        "nccl",
        "CUDA_VISIBLE_DEVICES",
    )


def test_npu_wins_over_cuda_when_torch_npu_has_a_device(monkeypatch):
    import importlib.util

    import torch

    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "torch_npu" else real_find_spec(n, *a)
    )
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8), raising=False
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    p = plat.detect()
    assert (p.name, p.ray_resource, p.dist_backend, p.visible_devices_env) == (
        "npu",
        "NPU",
        "hccl",
        "ASCEND_RT_VISIBLE_DEVICES",
    )


def test_torch_npu_without_device_falls_back(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "torch_npu" else real_find_spec(n, *a)
    )
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0), raising=False
    )
    assert plat.detect().name == "cpu"


def test_override_and_bad_override(monkeypatch):
    monkeypatch.setenv("DPSERVE_PLATFORM", "npu")
    assert plat.detect().name == "npu"
    plat.detect.cache_clear()
    monkeypatch.setenv("DPSERVE_PLATFORM", "tpu")
    with pytest.raises(ValueError, match="DPSERVE_PLATFORM"):
        plat.detect()


def test_rank_env_sets_visible_devices_and_cores():
    assert plat.NPU.rank_env(3, device_ids=[3])["ASCEND_RT_VISIBLE_DEVICES"] == "3"
    assert plat.CUDA.rank_env(0, device_ids=[0, 1])["CUDA_VISIBLE_DEVICES"] == "0,1"
    env = plat.CPU.rank_env(1, cpu_cores=[1])
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["OMP_NUM_THREADS"] == "1"
    assert plat.CPU.rank_env(0, cpu_cores=[0, 1, 2, 3])["OMP_NUM_THREADS"] == "4"
    assert plat.CPU.rank_env(0, cpu_cores=[0, 1, 2, 3], omp_threads=2)["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in plat.CUDA.rank_env(0, device_ids=[0])
    assert env["VLLM_CPU_KVCACHE_SPACE"] == plat.CPU_KVCACHE_GIB_DEFAULT


def test_apply_vllm_env_keeps_user_values():
    env = {"VLLM_CPU_KVCACHE_SPACE": "4"}
    applied = plat.apply_vllm_env(plat.CPU, env)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert "VLLM_CPU_KVCACHE_SPACE" not in applied
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
