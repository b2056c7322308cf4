"""The CPU collectives over a real two-process gloo group."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from npu_runtime.cpu_collectives import all_gatherv, reduce_scatterv
from npu_runtime.vllm_patches import local_expert_ids

SIZES = [3, 0]  # rank 1 has no tokens (an idle rank running a dummy batch still joins the collective)


def _rank_tensors(rank: int):
    rows = SIZES[rank]
    hidden = torch.arange(rows * 4, dtype=torch.bfloat16).reshape(rows, 4) + 100 * rank
    ids = torch.full((rows, 2), rank, dtype=torch.int32)
    weights = torch.rand(rows, 2, dtype=torch.float32, generator=torch.Generator().manual_seed(rank))
    return hidden, ids, weights


def _plain(t: torch.Tensor) -> tuple[str, list]:
    """A tensor as plain data: a tensor put on a queue is shared through a file descriptor that
    disappears when the worker exits, before the parent may have unpickled it."""
    return str(t.dtype), t.float().tolist()


def _tensor(plain: tuple[str, list]) -> torch.Tensor:
    dtype, values = plain
    return torch.tensor(values, dtype=getattr(torch, dtype.removeprefix("torch.")))


def _worker(rank: int, port: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = dist.group.WORLD
        out = all_gatherv(group, 2, rank, list(_rank_tensors(rank)), 0, SIZES)
        single = all_gatherv(group, 2, rank, _rank_tensors(rank)[0], 0, SIZES)
        x = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3) * (rank + 1)
        rs = reduce_scatterv(group, 2, rank, x, 0, [2, 3])
        xb = torch.ones(4, 2, dtype=torch.bfloat16)
        rs_even = reduce_scatterv(group, 2, rank, xb, 0, None)
        queue.put((rank, [_plain(t) for t in out], _plain(single), _plain(rs), _plain(rs_even)))
    finally:
        dist.destroy_process_group()


def test_all_gatherv_and_reduce_scatterv_over_gloo():
    from deployments.rank import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: rest for r, *rest in (queue.get(timeout=300) for _ in range(2))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    expected = [torch.cat([_rank_tensors(r)[i] for r in range(2)]) for i in range(3)]
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    for rank, (out, single, rs, rs_even) in results.items():
        out, single, rs, rs_even = [_tensor(t) for t in out], _tensor(single), _tensor(rs), _tensor(rs_even)
        for got, want in zip(out, expected, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(single, expected[0])
        start, n = (0, 2) if rank == 0 else (2, 3)
        assert torch.equal(rs, (x * 3)[start : start + n])
        assert rs_even.dtype == torch.bfloat16 and torch.equal(
            rs_even, torch.full((2, 2), 2.0, dtype=torch.bfloat16)
        )


def test_sizes_must_match_local_rows():
    with pytest.raises(ValueError, match="sizes"):
        all_gatherv(None, 2, 0, torch.zeros(2, 1), 0, [3, 1])


def test_local_expert_ids_zeroes_remote_experts():
    # 4 global experts; this rank holds experts 2 and 3 as local 0 and 1.
    expert_map = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)
    ids = torch.tensor([[0, 2], [3, 1]], dtype=torch.int64)
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    local, w = local_expert_ids(ids, weights, expert_map)
    assert local.tolist() == [[0, 0], [1, 0]] and local.dtype == ids.dtype
    assert torch.equal(w, torch.tensor([[0.0, 0.4], [0.7, 0.0]]))
