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


# ---- the group's platform: from the cluster, not from the deciding process -------------------------
@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"CPU": 8.0, "NPU": 16.0, "memory": 1e9}, "npu"),
        ({"CPU": 8.0, "GPU": 4.0}, "cuda"),
        ({"CPU": 8.0, "NPU": 8.0, "GPU": 2.0}, "npu"),  # npu -> cuda -> cpu, as detect()
        ({"CPU": 8.0}, "cpu"),
        ({"CPU": 8.0, "NPU": 0.0, "GPU": 0.0}, "cpu"),  # a resource at 0 is none
        ({"CPU": 8.0, "dpserve_host": 2.0, "accelerator_type:A100": 1.0}, "cpu"),
        ({}, "cpu"),
    ],
)
def test_platform_for_cluster(resources, expected):
    assert plat.platform_for_cluster(resources).name == expected


def _no_cluster() -> dict[str, float]:
    raise AssertionError("the cluster's resources are not asked for when the choice is made already")


@pytest.mark.parametrize(
    ("configured", "env", "resources", "expected"),
    [
        ("cpu", {}, {"NPU": 2.0}, ("cpu", "engine.platform")),  # the config decides
        ("npu", {"DPSERVE_PLATFORM": "cpu"}, None, ("npu", "engine.platform")),  # over the variable too
        (None, {"DPSERVE_PLATFORM": "cuda"}, None, ("cuda", "DPSERVE_PLATFORM")),
        (
            None,
            {"DPSERVE_PLATFORM": ""},
            {"NPU": 2.0},
            ("npu", "cluster resources {'NPU': 2.0}"),
        ),  # empty: unset
        (None, {}, {"CPU": 4.0, "GPU": 1.0}, ("cuda", "cluster resources {'GPU': 1.0}")),
        (None, {}, {"CPU": 4.0}, ("cpu", "cluster resources without NPU or GPU")),
    ],
)
def test_choose_platform(configured, env, resources, expected):
    platform, source = plat.choose_platform(
        configured, (lambda: resources) if resources else _no_cluster, env
    )
    assert (platform.name, source) == expected


def test_choose_platform_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown platform 'tpu'"):
        plat.choose_platform("tpu", _no_cluster, {})
    with pytest.raises(ValueError, match="DPSERVE_PLATFORM='tpu'"):
        plat.choose_platform(None, _no_cluster, {"DPSERVE_PLATFORM": "tpu"})


# ---- whether a node can run it: checked by each rank on its own node ------------------------------
SWITCH = plat.DEVICE_FROM_RAY_RESOURCE_ENV


@pytest.mark.parametrize(
    ("platform", "resources", "env", "devices", "how"),
    [
        (plat.CPU, {}, {}, False, "cpu"),  # anywhere, even without knowing the node
        (
            plat.NPU,
            {"NPU": 1.0},
            {SWITCH: "1"},
            False,
            "Ray resource NPU=1 (DPSERVE_DEVICE_FROM_RAY_RESOURCE)",
        ),
        (
            plat.NPU,
            {"NPU": 8.0},
            {SWITCH: "true"},
            False,
            "Ray resource NPU=8 (DPSERVE_DEVICE_FROM_RAY_RESOURCE)",
        ),
        (plat.NPU, {"NPU": 8.0}, {}, True, "npu devices"),  # a real Ascend node
        (plat.NPU, {}, {SWITCH: "1"}, True, "npu devices"),
        (
            plat.CUDA,
            {"GPU": 1.0},
            {SWITCH: "1"},
            False,
            "Ray resource GPU=1 (DPSERVE_DEVICE_FROM_RAY_RESOURCE)",
        ),
        (plat.CUDA, None, {}, True, "cuda devices"),  # outside Ray: devices alone
    ],
)
def test_check_node_runs_passes(platform, resources, env, devices, how):
    assert plat.check_node_runs(platform, "10.0.0.2 (h2)", resources, env, lambda p: devices) == how


@pytest.mark.parametrize(
    ("platform", "resources", "env", "match"),
    [
        # The resource is there but the switch is off: say which switch would make it count.
        (
            plat.NPU,
            {"NPU": 1.0},
            {},
            "torch_npu sees no npu device there, its Ray resource NPU=1 counts as "
            "the device only with DPSERVE_DEVICE_FROM_RAY_RESOURCE=1 in the node's environment",
        ),
        (plat.NPU, {"NPU": 1.0}, {SWITCH: "0"}, "only with DPSERVE_DEVICE_FROM_RAY_RESOURCE=1"),
        # A node without the resource (the head): the switch does not help.
        (plat.NPU, {"CPU": 4.0}, {SWITCH: "1"}, "and it advertises no Ray resource NPU"),
        (
            plat.CUDA,
            {"CPU": 4.0, "NPU": 1.0},
            {SWITCH: "1"},
            "torch.cuda sees no cuda device there, and it advertises no Ray resource GPU",
        ),
    ],
)
def test_check_node_runs_refuses_naming_node_and_platform(platform, resources, env, match):
    with pytest.raises(plat.PlatformUnavailable) as err:
        plat.check_node_runs(platform, "10.0.0.2 (h2)", resources, env, lambda p: False)
    assert str(err.value).startswith(f"node 10.0.0.2 (h2) cannot run platform {platform.name!r}: ")
    assert match in str(err.value)


def test_switch_is_checked_before_devices_so_no_torch_import():
    def devices(platform):
        raise AssertionError("looked for devices")

    assert plat.check_node_runs(plat.NPU, "n", {"NPU": 1.0}, {SWITCH: "1"}, devices).startswith(
        "Ray resource"
    )


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), ("yes", True), (" ON ", True), ("0", False), ("", False)]
)
def test_device_from_ray_resource_switch(value, on):
    assert plat.device_from_ray_resource({SWITCH: value}) is on
    assert plat.device_from_ray_resource({}) is False
