"""Variable-size collectives for vLLM's CPU communicator, over gloo.

vLLM 0.32's `CpuCommunicator` inherits `all_gatherv` / `reduce_scatterv` from the base class, which
raises `NotImplementedError`. The MoE data-parallel path (`AgRsAll2AllManager`: gather tokens from all
DP ranks before the experts, reduce-scatter the results after) calls both every MoE layer, so an MoE
model with DP>1 dies on its first request. These functions fill the gap.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _as_byte_rows(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as `[rows, row_bytes]` uint8 (rows = first dimension)."""
    # The row width comes from the shape, not the data: a rank with zero rows must still agree on it.
    cols = math.prod(t.shape[1:])
    return t.contiguous().reshape(t.shape[0], cols).view(torch.uint8)


def all_gatherv(
    group: dist.ProcessGroup,
    world_size: int,
    rank_in_group: int,
    input_: torch.Tensor | list[torch.Tensor],
    dim: int = 0,
    sizes: list[int] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Gather tensors whose first dimension differs per rank (`sizes[r]` rows on rank r).

    All tensors of a call are packed as bytes into one `[max_rows, total_row_bytes]` buffer so the
    whole gather is a single gloo collective, then unpacked and trimmed to each rank's size.
    """
    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")
    single = isinstance(input_, torch.Tensor)
    tensors = [input_] if single else list(input_)
    rows = tensors[0].shape[0]
    if sizes is None:
        sizes = [rows] * world_size
    if len(sizes) != world_size or sizes[rank_in_group] != rows:
        raise ValueError(f"all_gatherv: sizes {sizes} do not match local rows {rows} at rank {rank_in_group}")
    for t in tensors:
        if t.shape[0] != rows:
            raise ValueError("all_gatherv: every tensor of one call must have the same first dimension")

    byte_rows = [_as_byte_rows(t) for t in tensors]
    widths = [b.shape[1] for b in byte_rows]
    max_rows = max(sizes)
    packed = torch.zeros(max_rows, sum(widths), dtype=torch.uint8)
    if rows:
        packed[:rows] = torch.cat(byte_rows, dim=1)
    gathered = torch.empty(world_size * max_rows, packed.shape[1], dtype=torch.uint8)
    dist.all_gather_into_tensor(gathered, packed, group=group)
    gathered = gathered.view(world_size, max_rows, -1)

    # Keep each rank's valid rows, in rank order.
    valid = torch.cat([gathered[r, : sizes[r]] for r in range(world_size)], dim=0)
    outputs = []
    offset = 0
    for t, width in zip(tensors, widths, strict=True):
        part = valid[:, offset : offset + width].contiguous()
        offset += width
        outputs.append(part.view(t.dtype).reshape((sum(sizes),) + tuple(t.shape[1:])))
    return outputs[0] if single else outputs


def reduce_scatterv(
    group: dist.ProcessGroup,
    world_size: int,
    rank_in_group: int,
    input_: torch.Tensor,
    dim: int = -1,
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Sum `input_` over ranks and return this rank's slice (`sizes[r]` rows along `dim`).

    gloo has no reduce-scatter, so this is an all-reduce (in float32 for low-precision inputs, which
    gloo may not sum and whose rounding would depend on rank order) followed by a slice.
    """
    if dim < 0:
        dim += input_.dim()
    total = input_.shape[dim]
    if sizes is None:
        if total % world_size:
            raise ValueError(f"reduce_scatterv: {total} rows do not split evenly over {world_size} ranks")
        sizes = [total // world_size] * world_size
    if len(sizes) != world_size or sum(sizes) != total:
        raise ValueError(f"reduce_scatterv: sizes {sizes} do not add up to {total}")
    work = input_.to(torch.float32) if input_.dtype in (torch.bfloat16, torch.float16) else input_.clone()
    dist.all_reduce(work, group=group)
    start = sum(sizes[:rank_in_group])
    return work.narrow(dim, start, sizes[rank_in_group]).to(input_.dtype).contiguous()
