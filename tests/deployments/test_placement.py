"""Per-host CPU binding: ranks spread over hosts pick their cores on their own host."""

from __future__ import annotations

import os

import pytest

from deployments.placement import cpu_cores_for_rank, host_slots


def test_host_slots_number_ranks_per_host() -> None:
    assert host_slots(["a", "a"]) == [(0, 2), (1, 2)]
    assert host_slots(["a", "b", "a", "b", "c"]) == [(0, 2), (0, 2), (1, 2), (1, 2), (0, 1)]
    assert host_slots([]) == []


def test_split_binding_per_host_gives_each_host_all_its_cores() -> None:
    # 4 ranks on 2 hosts of 8 cores: each host's two ranks split its 8 cores.
    slots = host_slots(["a", "b", "a", "b"])
    cores = [cpu_cores_for_rank(i, k, num_cores=8, binding="split") for i, k in slots]
    assert cores == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    ("binding", "slot", "bind", "threads"),
    [
        ("shared", (1, 2), "0,1,2,3,4,5,6,7", "4"),
        ("split", (1, 2), "4,5,6,7", "4"),
        ("shared", (0, 1), "0,1,2,3,4,5,6,7", "8"),
    ],
)
def test_rank_binds_from_its_host_slot(
    monkeypatch: pytest.MonkeyPatch, binding: str, slot, bind: str, threads: str
) -> None:
    from deployments.rank import DPRank

    env: dict[str, str] = {"VLLM_HOST_IP": "127.0.0.1"}
    monkeypatch.setattr("os.environ", env)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    # Rank 3 of 4, on a host it shares with `slot[1] - 1` other ranks.
    rank = DPRank({"data_parallel_size": 4, "cpu_binding": binding}, 3, platform_name="cpu", host_slot=slot)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == bind
    assert env["OMP_NUM_THREADS"] == threads
    assert rank.env.ranks_on_host == slot[1]
