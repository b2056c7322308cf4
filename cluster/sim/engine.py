"""The lockstep loop: N DP ranks, each with a model of vLLM's scheduler, one gate for the group.

Each synchronized step:

1. one snapshot of every rank's (running, waiting) goes to the real gate policy
   (`scheduler.policy`), with the group's recent load built from the snapshots so far
   (`scheduler.policy.LoadWindow`, as the coordinator builds it), and its single decision applies to
   every rank;
2. each rank schedules like vLLM's ``Scheduler.schedule()``: running requests first, in order (a
   decode costs one token, an unfinished prefill continues with its next chunk), then — if the gate
   admits — waiting requests in FCFS order while the token budget (``max_num_batched_tokens``) and
   ``max_num_seqs`` allow, the last one chunked to the remaining budget (and every chunk capped by
   ``long_prefill_token_threshold`` when set). Once the budget is spent, the rest of the running list is
   not scheduled this step, as in vLLM;
3. the step takes the slowest rank's time (`costs`), which includes MoE and all-to-all terms set by
   the busiest EP rank under the current expert placement;
4. at the step's end, completed prefills emit their first token, decodes emit one token, finished
   requests leave (freeing the client's concurrency slot), and requests that reached the engines during
   the step join the waiting queues (they were routed on arrival by the router).

Decoding requests are not touched one by one per step: a request's finishing step is known when its
first token is out (and pushed back whenever a step does not schedule it), so a step costs O(ranks)
plus O(events). That is what keeps 64 ranks x 10,000 requests in seconds.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.sim.config import SimConfig
from cluster.sim.costs import CostModel
from cluster.sim.experts import ExpertModel
from cluster.sim.workload import Client, Router, make_requests
from scheduler.policy import GatePolicy, LoadWindow, RankCounts, make_policy


@dataclass
class SimResult:
    """Everything a run produced: per-request times, per-step traces and counters."""

    policy: str
    num_ranks: int
    prompt_len: np.ndarray
    output_len: np.ndarray
    rank: np.ndarray  # rank each request ran on
    send_t: np.ndarray
    first_t: np.ndarray
    finish_t: np.ndarray
    finish_count: np.ndarray  # how many times each request finished (must be 1)
    prefilled: np.ndarray  # prompt tokens computed per request
    step_start: np.ndarray  # [steps]
    step_time: np.ndarray  # [steps]
    rank_time: np.ndarray  # [steps, ranks]; empty when not recorded
    running: np.ndarray  # [steps, ranks] running counts in the gate's snapshot
    waiting: np.ndarray  # [steps, ranks]
    admit: np.ndarray  # [steps] gate decisions
    admitted: np.ndarray  # [steps] requests admitted from waiting
    prefill_tokens: np.ndarray  # [steps] prompt tokens scheduled (all ranks)
    decode_tokens: np.ndarray  # [steps] decode tokens scheduled (all ranks)
    output_tokens: np.ndarray  # [steps] output tokens emitted (first tokens + decodes)
    moe_imbalance: np.ndarray  # [steps] mean over layers of busiest / mean EP rank load
    eplb_rebalances: int = 0
    eplb_moved_slots: int = 0
    preemptions: int = 0  # requests pushed back to waiting for lack of KV cache (recompute)
    # [steps] seconds of expert-weight transfer each step carried (0 outside EPLB moves)
    transfer_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eplb_plan_moves: list[int] = field(default_factory=list)  # slots moved per plan, all layers
    eplb_async_layer_s: list[float] = field(default_factory=list)  # per async layer move, seconds
    eplb_sync_stall_s: list[float] = field(default_factory=list)  # per stop-the-world move, seconds
    eplb_plans: list[dict[str, float]] = field(default_factory=list)  # `ExpertModel.plan_log`
    # [steps] max/mean under the popularity itself (no per-step sampling noise), mean over layers
    moe_imbalance_expected: np.ndarray = field(default_factory=lambda: np.zeros(0))
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_time)

    def metrics(self) -> dict[str, float]:
        """The seed's table (TTFT, TPOT, duration, throughputs) plus a few diagnostics."""
        ttft = (self.first_t - self.send_t) * 1e3
        multi = self.output_len > 1
        tpot = (self.finish_t[multi] - self.first_t[multi]) / (self.output_len[multi] - 1) * 1e3
        duration = float(np.nanmax(self.finish_t) - np.nanmin(self.send_t))
        prefill_steps = self.prefill_tokens > 0
        return {
            "mean_ttft_ms": float(np.mean(ttft)),
            "median_ttft_ms": float(np.median(ttft)),
            "p99_ttft_ms": float(np.percentile(ttft, 99)),
            "mean_tpot_ms": float(np.mean(tpot)) if tpot.size else float("nan"),
            "duration_s": duration,
            "input_tok_s": float(self.prompt_len.sum() / duration),
            "output_tok_s": float(self.output_len.sum() / duration),
            "request_s": float(len(self.prompt_len) / duration),
            "steps": float(self.steps),
            "prefill_step_frac": float(prefill_steps.mean()) if self.steps else 0.0,
            "mean_step_ms": float(self.step_time.mean() * 1e3) if self.steps else 0.0,
            "mean_decode_only_step_ms": float(self.step_time[~prefill_steps].mean() * 1e3)
            if (~prefill_steps).any()
            else float("nan"),
            "mean_moe_imbalance": float(self.moe_imbalance.mean()) if self.steps else float("nan"),
            "eplb_rebalances": float(self.eplb_rebalances),
            "preemptions": float(self.preemptions),
            "max_step_ms": float(self.step_time.max() * 1e3) if self.steps else 0.0,
            "wall_s": self.wall_s,
        }


def _rng_streams(seed: int) -> list[np.random.Generator]:
    # Separate streams per concern: the workload must not change when a policy changes how often
    # experts are sampled or requests are routed.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]


def simulate(
    cfg: SimConfig,
    policy: str | GatePolicy = "off",
    *,
    record_rank_time: bool = True,
    max_steps: int | None = None,
) -> SimResult:
    """Run one simulation of ``cfg`` under gate ``policy`` (a name from `scheduler.policy.POLICIES`,
    built with ``cfg.gate.params[name]``, or a ready policy object)."""
    cfg.validate()
    wall0 = time.perf_counter()
    if isinstance(policy, str):
        gate: GatePolicy = make_policy(policy, **cfg.gate.params.get(policy, {}))
    else:
        gate = policy
    rng_work, rng_expert, rng_client, rng_router = _rng_streams(cfg.seed)
    reqs = make_requests(cfg.workload, rng_work)
    client = Client(reqs, cfg.workload, rng_client)
    R = cfg.cluster.num_ranks
    router = Router(cfg.router, R, rng_router)
    costs = CostModel(cfg.costs, cfg.model.num_moe_layers, cfg.experts.sim_layers, cfg.model.top_k)
    experts = ExpertModel(cfg.model, cfg.experts, cfg.eplb, R, rng_expert, cfg.transfer)
    mns = cfg.cluster.max_num_seqs
    B = cfg.cluster.max_num_batched_tokens
    thr = cfg.cluster.long_prefill_token_threshold
    top_k = cfg.model.top_k

    n = reqs.n
    prompt = reqs.prompt_len.tolist()  # Python ints: the per-request hot paths are scalar
    out_len = reqs.output_len.tolist()
    # Tokens the next (re)prefill computes: the prompt, or after a preemption (vLLM's recompute mode)
    # the prompt plus the tokens generated before it.
    plen = list(prompt)
    gen0 = [0] * n  # tokens generated before the current (re)prefill
    computed = [0] * n
    rank_of = np.full(n, -1, dtype=np.int64)
    first_t = np.full(n, np.nan)
    finish_t = np.full(n, np.nan)
    finish_count = np.zeros(n, dtype=np.int64)
    finish_step = [0] * n
    finish_at: dict[int, list[int]] = defaultdict(list)

    running: list[list[int]] = [[] for _ in range(R)]
    waiting: list[deque[int]] = [deque() for _ in range(R)]
    prefilling = [0] * R  # running requests whose prompt is not fully computed
    n_dec = [0] * R  # running requests that decode
    dec_ctx = np.zeros(R)  # sum over decoding requests of their context length
    kv_cap = cfg.cluster.kv_cache_tokens  # per rank; 0 = unlimited
    pf_kv = [0] * R  # KV tokens held by running requests whose prefill is not complete
    preemptions = 0

    def preempt(r: int) -> None:
        """vLLM's recompute preemption: the newest running request frees its KV and goes back to the
        front of the waiting queue; its next prefill recomputes its prompt and generated tokens."""
        nonlocal preemptions
        rid = running[r].pop()
        preemptions += 1
        if computed[rid] < plen[rid]:
            prefilling[r] -= 1
            pf_kv[r] -= computed[rid]
        else:
            ctx_now = prompt[rid] + out_len[rid] - (finish_step[rid] - step + 1)
            finish_at[finish_step[rid]].remove(rid)
            n_dec[r] -= 1
            dec_ctx[r] -= ctx_now
            gen0[rid] = ctx_now - prompt[rid]
            plen[rid] = ctx_now
        computed[rid] = 0
        waiting[r].appendleft(rid)

    rec: dict[str, list[Any]] = defaultdict(list)
    snapshots: deque[list[RankCounts]] = deque(maxlen=cfg.cluster.gate_lag_steps + 1)
    load = LoadWindow()  # the group's recent load, from the snapshots the decisions are made from
    t = 0.0
    step = 0
    done = 0

    def admit_arrivals(before: float, inbox: list[tuple[int, int]] | None) -> None:
        for a, rid in client.pop_arrivals(before):
            r = router.route(a, [len(w) for w in waiting], [len(x) for x in running])
            rank_of[rid] = r
            if inbox is None:
                waiting[r].append(rid)
            else:
                inbox.append((r, rid))

    while done < n:
        if max_steps is not None and step >= max_steps:
            raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        if not any(running) and not any(waiting):
            # Every engine is idle (vLLM pauses the DP wave): jump to the next arrival.
            nxt = client.next_arrival()
            if math.isinf(nxt):
                raise RuntimeError("no work left but requests unfinished")  # pragma: no cover
            t = max(t, nxt)
            admit_arrivals(math.nextafter(t, math.inf), None)
            continue

        # 1. One snapshot, one decision for every rank (from the snapshot gate_lag_steps old).
        counts = [RankCounts(r, len(running[r]), len(waiting[r]), mns, step) for r in range(R)]
        snapshots.append(counts)
        decision = gate.decide(snapshots[0], step, load.observe(snapshots[0], step))
        admit = decision.admit

        # 2. Per-rank scheduling.
        tokens = np.zeros(R)
        ctx = dec_ctx.copy()
        pairs = np.zeros(R)
        prefills: list[tuple[int, int, int]] = []  # (rank, request, tokens)
        starved: list[int] = []
        n_admitted = 0
        for r in range(R):
            run = running[r]
            free_kv = math.inf
            if kv_cap:
                # Every decode writes one token of KV this step; preempt until they fit.
                while run and dec_ctx[r] + pf_kv[r] + n_dec[r] > kv_cap:
                    preempt(r)
                free_kv = kv_cap - dec_ctx[r] - pf_kv[r] - n_dec[r]
            can_admit = admit and waiting[r] and len(run) < mns and free_kv > 0
            if not prefilling[r] and not can_admit:
                tokens[r] = n_dec[r]  # decode only: len(run) <= max_num_seqs <= budget
                continue
            budget = B
            if not prefilling[r]:
                budget -= n_dec[r]
            else:
                for rid in run:  # vLLM's RUNNING loop, in order
                    rem = plen[rid] - computed[rid]
                    if budget <= 0:
                        if rem <= 0:
                            starved.append(rid)
                            ctx[r] -= (
                                prompt[rid] + out_len[rid] - (finish_step[rid] - step + 1)
                            )  # KV not read this step
                        continue
                    if rem > 0:
                        nt = min(rem, budget, thr) if thr > 0 else min(rem, budget)
                        nt = int(min(nt, free_kv))
                        if nt <= 0:
                            continue  # no KV for its next chunk: it waits for a finish to free some
                        free_kv -= nt
                        prefills.append((r, rid, nt))
                        pairs[r] += nt * (computed[rid] + nt / 2)
                        budget -= nt
                    else:
                        budget -= 1
            if can_admit:
                w = waiting[r]
                while w and budget > 0 and len(run) < mns and free_kv > 0:  # vLLM's WAITING loop
                    rid = w.popleft()
                    nt = min(plen[rid], budget, thr) if thr > 0 else min(plen[rid], budget)
                    nt = int(min(nt, free_kv))
                    free_kv -= nt
                    run.append(rid)
                    prefilling[r] += 1
                    prefills.append((r, rid, nt))
                    pairs[r] += nt * nt / 2
                    budget -= nt
                    n_admitted += 1
            tokens[r] = B - budget

        # 3. Step time: slowest rank; MoE/all-to-all from the busiest EP rank.
        total = int(tokens.sum())
        loads = experts.route(total)
        rl = experts.rank_loads(loads)
        max_recv = rl.max(axis=1)
        moe, a2a = costs.moe_and_a2a(max_recv, float(tokens.max()) * top_k)
        rank_time = costs.attention(tokens, ctx, pairs) + (moe + a2a)
        transfer = experts.transfer_step(
            float(rank_time.max()), costs.a2a_link(max_recv, float(tokens.max()) * top_k)
        )
        rank_time += transfer
        T = float(rank_time.max())
        t_end = t + T

        # Requests that reach the engines during the step are routed on arrival and wait for its end.
        inbox: list[tuple[int, int]] = []
        admit_arrivals(t_end, inbox)

        # 4. End of step: decodes, then completed prefills, then finishes.
        produced = 0
        for rid in starved:
            r = int(rank_of[rid])
            finish_at[finish_step[rid]].remove(rid)
            finish_step[rid] += 1
            finish_at[finish_step[rid]].append(rid)
        n_starved = np.bincount(rank_of[starved], minlength=R) if starved else np.zeros(R, dtype=np.int64)
        for r in range(R):
            k = n_dec[r] - int(n_starved[r])
            produced += k
            dec_ctx[r] += k
        decode_tokens = produced
        prefill_tokens = 0
        for r, rid, nt in prefills:
            prefill_tokens += nt
            computed[rid] += nt
            pf_kv[r] += nt
            if computed[rid] == plen[rid]:
                prefilling[r] -= 1
                pf_kv[r] -= plen[rid]
                if math.isnan(first_t[rid]):
                    first_t[rid] = t_end
                produced += 1
                n_dec[r] += 1
                dec_ctx[r] += plen[rid] + 1
                finish_step[rid] = step + out_len[rid] - gen0[rid] - 1
                finish_at[finish_step[rid]].append(rid)
        for rid in finish_at.pop(step, ()):
            r = int(rank_of[rid])
            finish_t[rid] = t_end
            finish_count[rid] += 1
            running[r].remove(rid)
            n_dec[r] -= 1
            dec_ctx[r] -= prompt[rid] + out_len[rid]
            done += 1
            client.on_finish(t_end)
        for r, rid in inbox:
            waiting[r].append(rid)
        # Finishes can free client slots whose requests arrive within this same instant's delay.

        rec["start"].append(t)
        rec["time"].append(T)
        rec["transfer"].append(transfer)
        rec["imb_expected"].append(experts.expected_imbalance())
        if record_rank_time:
            rec["rank_time"].append(rank_time)
        rec["running"].append([c.running for c in counts])
        rec["waiting"].append([c.waiting for c in counts])
        rec["admit"].append(admit)
        rec["admitted"].append(n_admitted)
        rec["prefill"].append(prefill_tokens)
        rec["decode"].append(decode_tokens)
        rec["output"].append(produced)
        mean_recv = rl.mean(axis=1)
        rec["imb"].append(
            float(np.mean(np.divide(max_recv, mean_recv, where=mean_recv > 0, out=np.ones_like(max_recv))))
        )

        experts.drift(T)
        t = t_end
        step += 1
        experts.maybe_rebalance(step)

    def arr(key: str, dtype: Any, shape: Sequence[int] = ()) -> np.ndarray:
        v = rec.get(key)
        return np.asarray(v, dtype=dtype) if v else np.zeros((0, *shape), dtype=dtype)

    return SimResult(
        policy=getattr(gate, "name", str(policy)),
        num_ranks=R,
        prompt_len=reqs.prompt_len,
        output_len=reqs.output_len,
        rank=rank_of,
        send_t=client.send_t,
        first_t=first_t,
        finish_t=finish_t,
        finish_count=finish_count,
        prefilled=np.asarray(computed, dtype=np.int64),
        step_start=arr("start", np.float64),
        step_time=arr("time", np.float64),
        rank_time=arr("rank_time", np.float64, (R,)),
        running=arr("running", np.int32, (R,)),
        waiting=arr("waiting", np.int32, (R,)),
        admit=arr("admit", bool),
        admitted=arr("admitted", np.int64),
        prefill_tokens=arr("prefill", np.int64),
        decode_tokens=arr("decode", np.int64),
        output_tokens=arr("output", np.int64),
        moe_imbalance=arr("imb", np.float64),
        eplb_rebalances=experts.rebalances,
        preemptions=preemptions,
        eplb_moved_slots=experts.moved_slots,
        transfer_s=arr("transfer", np.float64),
        eplb_plan_moves=list(experts.plan_moves),
        eplb_async_layer_s=list(experts.async_layer_costs),
        eplb_sync_stall_s=list(experts.sync_stalls),
        eplb_plans=list(experts.plan_log),
        moe_imbalance_expected=arr("imb_expected", np.float64),
        wall_s=time.perf_counter() - wall0,
        notes=list(dict.fromkeys(experts.notes)),
    )
