"""GPU check (vLLM 0.32 on CUDA): the balance scheduler in vLLM's async-scheduling loop, and expert-slot
transfers over NCCL on a side stream; prints what it measured as JSON.

Not run yet: no GPU machine has been available to this project. Without CUDA it exits with status 2
and says so.

1. Balance scheduler, async loop: the tiny MoE model in an in-process engine, once with vLLM's own
   scheduler and once with `BalanceAutoScheduler` (no coordinator: the gate stays open), greedy. It
   checks that the async loop is on and picked `BalanceAsyncScheduler`, that both runs give the same
   tokens, and reports tokens/s of each and the gate's counters (a plain Scheduler subclass in the
   async loop schedules an empty batch every other step: `steps` close to the tokens generated, not
   twice that).
2. EPLB transfers: eplb.applier moves expert slots over gloo (CPU) today. Two processes on one GPU
   each (or one GPU shared) exchange slot-sized tensors with NCCL isend/irecv on a side stream while
   the default stream runs matmuls, and the same with gloo from host memory, so the cost of a NCCL
   path for the applier is measured before it is written.

Usage: python benchmarks/gpu_check.py [--requests 32] [--tokens 64] [--slot-mb 24] [--slots 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False); this check needs an "
              "NVIDIA GPU with vLLM 0.32 (pip install -e .[cuda])", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


def _engine(model: str, scheduler_cls: str | None) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if scheduler_cls is not None:
        kwargs = {
            "scheduler_cls": scheduler_cls,
            "additional_config": {"dpserve_balance": {"transport": "none"}},
        }
    return LLM(model=model, dtype="float32", max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3,
               **kwargs)  # fmt: skip


def _generate(llm: Any, requests: int, tokens: int) -> tuple[list[list[int]], float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8, 9, 10 + i]} for i in range(requests)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def check_balance_async(model: str, requests: int, tokens: int) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: the scheduler is reachable
    import gc

    import torch

    plain = _engine(model, None)
    ref, plain_s = _generate(plain, requests, tokens)
    del plain
    gc.collect()
    torch.cuda.empty_cache()

    llm = _engine(model, "scheduler.balance_scheduler.BalanceAutoScheduler")
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    got, balance_s = _generate(llm, requests, tokens)
    stats = scheduler.balance_stats()
    total = requests * tokens
    return {
        "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling),
        "scheduler": type(scheduler).__name__,
        "tokens_identical": got == ref,
        "plain_tokens_per_s": total / plain_s,
        "balance_tokens_per_s": total / balance_s,
        "schedule_calls": stats["steps"],
        "tokens_per_request": tokens,
        "gate": {k: stats[k] for k in ("closed_steps", "held_steps", "no_decision_steps", "fallback_steps")},
    }


def _transfer_worker(rank: int, world: int, port: int, slot_mb: int, slots: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    gloo = dist.new_group(backend="gloo")
    n = slot_mb * 2**20 // 4
    send = [torch.full((n,), float(rank * 100 + i), device=device) for i in range(slots)]
    recv = [torch.empty(n, device=device) for _ in range(slots)]
    peer = 1 - rank
    side = torch.cuda.Stream(device)
    a = torch.randn(4096, 4096, device=device)

    def nccl_round(with_compute: bool) -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.cuda.stream(side):
            ops = [dist.P2POp(dist.isend, s, peer) for s in send] + [
                dist.P2POp(dist.irecv, r, peer) for r in recv
            ]
            works = dist.batch_isend_irecv(ops)
        if with_compute:
            for _ in range(20):
                a.matmul(a)
        for w in works:
            w.wait()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def compute_only() -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(20):
            a.matmul(a)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def gloo_round() -> float:
        host_send = [s.cpu() for s in send]
        host_recv = [torch.empty(n) for _ in range(slots)]
        dist.barrier(group=gloo)
        t0 = time.perf_counter()
        works = [dist.isend(s, peer, group=gloo) for s in host_send] + [
            dist.irecv(r, peer, group=gloo) for r in host_recv
        ]
        for w in works:
            w.wait()
        return time.perf_counter() - t0

    nccl_round(False)  # warm-up: NCCL communicator set-up
    out = {
        "nccl_alone_s": min(nccl_round(False) for _ in range(3)),
        "nccl_with_compute_s": min(nccl_round(True) for _ in range(3)),
        "compute_alone_s": min(compute_only() for _ in range(3)),
        "gloo_host_s": min(gloo_round() for _ in range(3)),
        "bytes_each_way": slots * n * 4,
    }
    # The i-th receive pairs with the peer's i-th send: every slot arrived whole.
    intact = all(bool((r == float(peer * 100 + i)).all()) for i, r in enumerate(recv))
    queue.put((rank, out | {"slots_intact": intact}))
    dist.destroy_process_group()


def check_transfers(slot_mb: int, slots: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from deployments.rank import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_transfer_worker, args=(r, 2, port, slot_mb, slots, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    r0 = results[0]
    gb = r0["bytes_each_way"] / 1e9
    return results | {"nccl_gb_per_s": gb / r0["nccl_alone_s"], "gloo_gb_per_s": gb / r0["gloo_host_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the tiny MoE model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slot-mb", type=int, default=24, help="bytes of one expert slot, MiB")
    parser.add_argument("--slots", type=int, default=8, help="slots each rank sends per round")
    args = parser.parse_args(argv)
    require_cuda()
    import torch
    import vllm

    if args.model is None:
        from npu_runtime.tiny_model import build_tiny_moe

        args.model = str(build_tiny_moe())
    report = {"device": torch.cuda.get_device_name(0), "vllm": vllm.__version__, "torch": torch.__version__}
    report["transfers"] = check_transfers(args.slot_mb, args.slots)
    report["balance_async"] = check_balance_async(args.model, args.requests, args.tokens)
    print(json.dumps(report, indent=2))
    b = report["balance_async"]
    ok = b["async_scheduling"] and b["scheduler"] == "BalanceAsyncScheduler" and b["tokens_identical"]
    ok = ok and all(report["transfers"][r]["slots_intact"] for r in (0, 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
