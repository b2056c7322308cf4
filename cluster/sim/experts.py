"""Expert routing (skewed, drifting), expert placement over the EP ranks, and EPLB re-placement.

Only ``sim_layers`` representative MoE layers are simulated (their costs are scaled up to the model's
layer count in `costs`): the per-step work is then independent of the layer count, which is what makes
64 ranks x 10,000 requests run in seconds. Each layer has its own popularity, so layer-to-layer
variation in imbalance is kept.

Popularity: per layer l and expert e, log-popularity = sigma_l * (sqrt(c) * shared[e] + sqrt(1 - c) *
own[l, e]) with ``shared`` and ``own`` independent unit-variance Ornstein-Uhlenbeck processes (c =
``layer_correlation``; sigma_l grows with depth by ``depth_skew``), or a recorded trace
(``loads_file``). Routed counts per step are Poisson around tokens * top_k * popularity.

Placement uses the EPLB package's conventions and functions: ``phy2log [layers, num_ranks *
slots_per_rank]`` with rank r owning slots ``r * S .. (r + 1) * S - 1``, start-up placement
`eplb.policies.default_placement`, plans from `eplb.policies.rebalance`, transfer ops from
`eplb.plan.build_transfer_plan`. A token for an expert with k replicas is split evenly over them
(vLLM picks replicas by token position, so the split is even in expectation).

Driving, as the product does it: a plan every ``eplb.interval_steps`` steps on the load since the last
plan, or on a recency-weighted load (``eplb.window_half_life_s``, `eplb.load.DecayingLoad`), the first
plan optionally after a shorter warm-up (``eplb.first_plan_steps``); an asynchronous plan moves
``eplb.layers_per_step`` real layers per step (or as many as the step's compute hides,
``eplb.layers_fit_step``; both rules are `eplb.pacing`'s), and each simulated layer's new placement takes
effect once all the real layers it stands for have moved. The product runs the same two rules when
configured for it: the EPLB actor's ``first_window_steps`` and the ranks' ``transfer.fit_step`` (whose
piece cost is a configured link rate and latency, where the simulator uses its transfer model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cluster.sim.config import EplbConfig, ExpertConfig, ModelConfig, TransferConfig
from cluster.sim.transfer import LayerTransfer, async_layers_cost_s, layer_transfer, sync_stall_s
from eplb.load import DecayingLoad
from eplb.pacing import layers_this_step, plan_due
from eplb.plan import build_transfer_plan
from eplb.policies import default_placement
from eplb.stats import imbalance


def load_trace(path: str, num_experts: int, sim_layers: int) -> np.ndarray:
    """Read a recorded load trace: float [windows, sim_layers, num_experts], rows summing to 1.

    The file is a .npy of `dpserve eplb plan --loads` format, float [layers, num_experts], or a stack
    of them [windows, layers, num_experts]. ``sim_layers`` layers are taken evenly spaced over the
    file's layers (first and last included). A layer with no load gets a uniform popularity.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"experts.loads_file {path!r}: cannot read as .npy ({exc})") from exc
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"experts.loads_file {path!r}: loads must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"experts.loads_file {path!r}: expected [layers, experts] or [windows, layers, experts], "
            f"got shape {arr.shape}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"experts.loads_file {path!r}: loads must be finite and >= 0")
    if arr.shape[2] != num_experts:
        raise ValueError(
            f"experts.loads_file {path!r}: {arr.shape[2]} experts per layer, model has {num_experts}"
        )
    if arr.shape[1] < sim_layers:
        raise ValueError(
            f"experts.loads_file {path!r}: {arr.shape[1]} layers, fewer than experts.sim_layers={sim_layers}"
        )
    idx = np.round(np.linspace(0, arr.shape[1] - 1, sim_layers)).astype(np.int64)
    arr = arr[:, idx]
    tot = arr.sum(axis=2, keepdims=True)
    return np.where(tot > 0, arr / np.where(tot > 0, tot, 1.0), 1.0 / num_experts)


def real_layers_per_sim_layer(num_moe_layers: int, sim_layers: int) -> np.ndarray:
    """How many real MoE layers each simulated layer stands for: int64 [sim_layers], summing to the
    model's layer count (58 over 4 gives 14, 15, 15, 14)."""
    edges = np.round(np.linspace(0, num_moe_layers, sim_layers + 1)).astype(np.int64)
    return np.diff(edges)


def _load_eplb():
    """Import the EPLB policy entry point, with a clear message when the package is not there."""
    try:
        from eplb.policies import POLICIES, rebalance
    except ImportError as exc:  # pragma: no cover - depends on the tree's state
        raise RuntimeError(
            f"eplb.policy is set but eplb.policies cannot be imported ({exc}); set eplb.policy: none"
        ) from exc
    return POLICIES, rebalance


@dataclass
class Transfer:
    """An accepted re-placement on its way to the ranks."""

    phy2log: np.ndarray  # the new placement, in force once the transfer ends
    layers: list[LayerTransfer]  # real layers still to move, in order (async: layers_per_step per step)
    owners: list[int]  # the simulated layer each entry of `layers` belongs to


class ExpertModel:
    """Draws per-step expert loads, keeps the placement, and runs EPLB on its cadence."""

    def __init__(
        self,
        model: ModelConfig,
        experts: ExpertConfig,
        eplb: EplbConfig,
        num_ranks: int,
        rng: np.random.Generator,
        transfer: TransferConfig | None = None,
    ) -> None:
        self.E = model.num_experts
        self.top_k = model.top_k
        self.L = experts.sim_layers
        self.layer_scale = model.num_moe_layers / experts.sim_layers
        self.R = num_ranks
        self.num_redundant = experts.num_redundant
        self.S = (self.E + self.num_redundant) // num_ranks
        self.rng = rng
        self.sigma = experts.skew_sigma
        self.tau = experts.drift_timescale_s
        depth = (np.arange(self.L) + 0.5) / self.L
        self.layer_sigma = experts.skew_sigma * (1.0 + experts.depth_skew * (2.0 * depth - 1.0))  # [L]
        self.corr = experts.layer_correlation
        # Unit-variance OU states: per layer, and common to all layers (drawn only when used, so the
        # stream of an uncorrelated run does not depend on this option).
        self.own = rng.normal(size=(self.L, self.E))
        self.shared = rng.normal(size=self.E) if self.corr > 0 else np.zeros(self.E)
        self.trace = (
            load_trace(experts.loads_file, self.E, self.L) if experts.loads_file is not None else None
        )
        self.trace_window_steps = experts.trace_window_steps
        self.steps_routed = 0
        self.real_layers = real_layers_per_sim_layer(model.num_moe_layers, self.L)
        self._set_probs()
        self.eplb = eplb
        self._rebalance = None
        if eplb.policy != "none":
            policies, self._rebalance = _load_eplb()
            if eplb.policy not in policies:
                raise ValueError(
                    f"eplb.policy {eplb.policy!r} unknown; choose from {sorted(policies)} or none"
                )
        self.phy2log = default_placement(self.L, self.E, num_ranks, self.num_redundant)
        self._refresh_split()
        self.window = np.zeros((self.L, self.E))  # load since the last plan
        self.window_start = 0  # step of the last planning attempt (the window's start)
        hl = eplb.window_half_life_s
        self.decayed = DecayingLoad(self.L, self.E, float(hl)) if hl is not None else None
        self.transfer: Transfer | None = None
        self.tcfg = transfer if transfer is not None else TransferConfig()
        self.rebalances = 0  # accepted plans
        self.moved_slots = 0  # slots moved over all simulated layers
        self.plan_moves: list[int] = []  # per accepted plan: slots moved, scaled to the model's layers
        self.async_layer_costs: list[float] = []  # seconds each async layer move added to its step
        self.sync_stalls: list[float] = []  # seconds of each stop-the-world transfer
        # Per accepted plan: the placement's mean max/mean on the window it was planned from (before
        # and after), and on the popularity in force when it was planned and when it took effect
        # (no sampling noise): where a plan's balance is lost between planner and steps.
        self.plan_log: list[dict[str, float]] = []
        self.notes: list[str] = []

    @staticmethod
    def _softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def _refresh_split(self) -> None:
        # Share of an expert's tokens that each slot gets = 1 / replica count of the slot's expert.
        counts = np.zeros((self.L, self.E))
        np.add.at(counts, (np.arange(self.L)[:, None], self.phy2log), 1.0)
        self._slot_share = 1.0 / np.take_along_axis(counts, self.phy2log, axis=1)

    def _set_probs(self) -> None:
        if self.trace is not None:
            self._probs = self.trace[(self.steps_routed // self.trace_window_steps) % len(self.trace)]
            return
        c = self.corr
        z = math.sqrt(c) * self.shared[None, :] + math.sqrt(1.0 - c) * self.own  # unit variance
        self.logits = self.layer_sigma[:, None] * z
        self._probs = self._softmax(self.logits)

    def drift(self, dt: float) -> None:
        """Advance the log-popularities by ``dt`` seconds of an Ornstein-Uhlenbeck process (and age the
        recency-weighted load by as much)."""
        if self.decayed is not None and dt > 0:
            self.decayed.advance(dt)
        if self.trace is not None or dt <= 0 or self.sigma == 0 or math.isinf(self.tau):
            return
        a = math.exp(-dt / self.tau)
        b = math.sqrt(1 - a * a)
        # Exact OU update: the stationary std stays 1 (so sigma_l after scaling) whatever the step length.
        self.own = a * self.own + b * self.rng.normal(size=self.own.shape)
        if self.corr > 0:
            self.shared = a * self.shared + b * self.rng.normal(size=self.shared.shape)
        self._set_probs()

    def route(self, total_tokens: int) -> np.ndarray:
        """Per-layer, per-logical-expert routed (token, expert) counts for a step: float [L, E]."""
        if self.trace is not None and self.steps_routed % self.trace_window_steps == 0:
            self._set_probs()
        self.steps_routed += 1
        if total_tokens == 0:
            return np.zeros((self.L, self.E))
        loads = self.rng.poisson(total_tokens * self.top_k * self._probs).astype(np.float64)
        if self.decayed is not None:
            self.decayed.add(loads)
        else:
            self.window += loads
        return loads

    def rank_loads(self, loads: np.ndarray, phy2log: np.ndarray | None = None) -> np.ndarray:
        """(token, expert) pairs each rank's slots receive, per layer: [L, R]."""
        p = self.phy2log if phy2log is None else phy2log
        share = self._slot_share if phy2log is None else None
        if share is None:
            counts = np.zeros((self.L, self.E))
            np.add.at(counts, (np.arange(self.L)[:, None], p), 1.0)
            share = 1.0 / np.take_along_axis(counts, p, axis=1)
        slot = np.take_along_axis(loads, p, axis=1) * share
        return slot.reshape(self.L, self.R, self.S).sum(axis=2)

    def expected_imbalance(self) -> float:
        """Mean over layers of max/mean rank load under the current popularity (no sampling noise)."""
        rl = self.rank_loads(self._probs)
        return float((rl.max(axis=1) / rl.mean(axis=1)).mean())

    def maybe_rebalance(self, step: int) -> None:
        """On the EPLB cadence, plan with the real policy on the window's load and start a transfer."""
        if (
            self._rebalance is None
            or self.transfer is not None
            or not plan_due(
                step - self.window_start,
                self.eplb.interval_steps,
                self.eplb.first_plan_steps,
                self.rebalances,
            )
        ):
            return
        # As the actor: every attempt starts a new window, whether or not it leads to a plan.
        self.window_start = step
        if self.decayed is not None:
            load = self.decayed.total()  # the logical load does not depend on the placement: no reset
        else:
            load, self.window = self.window, np.zeros((self.L, self.E))
        if load.sum() == 0:
            return
        try:
            plan = self._rebalance(
                self.eplb.policy, load, self.R, self.num_redundant, current=self.phy2log, **self.eplb.params
            )
        except ModuleNotFoundError as exc:
            # The EPLB package validates `current` with a module that may not be in the tree yet.
            self.notes.append(f"rebalance without current placement ({exc})")
            plan = self._rebalance(self.eplb.policy, load, self.R, self.num_redundant, **self.eplb.params)
        new = np.asarray(plan.phy2log, dtype=np.int64)
        changed = new != self.phy2log  # [L, P]
        if not changed.any():
            return
        # The product's transfer planning picks each op's source (local copy, else the least-used
        # holder); its ranks decide which links the bytes cross.
        ops = build_transfer_plan(self.phy2log, new, self.R, self.E).ops_by_layer
        per_layer = []
        for layer in range(self.L):
            lops = ops.get(layer, [])
            src = np.fromiter((op.src_rank for op in lops), dtype=np.int64, count=len(lops))
            dst = np.fromiter((op.dst_rank for op in lops), dtype=np.int64, count=len(lops))
            per_layer.append(layer_transfer(src, dst, self.R, self.tcfg))
        self.moved_slots += int(changed.sum())
        self.plan_moves.append(
            int(sum(x.moved_slots * int(n) for x, n in zip(per_layer, self.real_layers, strict=True)))
        )
        self.rebalances += 1
        self.plan_log.append(
            {
                "step": float(step),
                "window_before": float(imbalance(load, self.phy2log, self.R).mean()),
                "window_after": float(imbalance(load, new, self.R).mean()),
                "popularity_before": float(imbalance(self._probs, self.phy2log, self.R).mean()),
                "popularity_after": float(imbalance(self._probs, new, self.R).mean()),
            }
        )
        # Each simulated layer stands for its share of the real layers; async moves layers_per_step
        # changed real layers per step (unchanged layers cost nothing and take no step).
        moving = [
            (layer, x, int(n)) for layer, (x, n) in enumerate(zip(per_layer, self.real_layers, strict=True))
        ]
        moving = [(layer, x, n) for layer, x, n in moving if x.moved_slots]
        self.transfer = Transfer(
            phy2log=new,
            layers=[x for _, x, n in moving for _ in range(n)],
            owners=[layer for layer, _, n in moving for _ in range(n)],
        )

    def transfer_step(self, step_s: float = 0.0, a2a_link_s: float = 0.0) -> float:
        """Seconds of weight transfer that this step carries; applies the placement when done.

        step_s: the step's time without the transfer; a2a_link_s: its all-to-all's bandwidth-bound
        time (what an asynchronous transfer competes with on the scale-out link).
        """
        if self.transfer is None:
            return 0.0
        if self.eplb.mode == "sync":
            cost = sync_stall_s(self.transfer.layers)
            self.sync_stalls.append(cost)
            self.transfer.layers = []
        else:
            k = min(self.eplb.layers_per_step, len(self.transfer.layers))
            if self.eplb.layers_fit_step:
                k = layers_this_step([x.layer_s for x in self.transfer.layers], step_s, k)
            xs, self.transfer.layers = self.transfer.layers[:k], self.transfer.layers[k:]
            done, self.transfer.owners = self.transfer.owners[:k], self.transfer.owners[k:]
            cost = async_layers_cost_s(xs, step_s, a2a_link_s, self.tcfg)
            self.async_layer_costs += [cost / k] * k  # per moved layer: what the seed's 1-2 ms compares with
            if self.eplb.commit_per_layer:
                finished = set(done) - set(self.transfer.owners[:1])
                if finished:
                    self.phy2log = self.phy2log.copy()
                    for layer in finished:
                        self.phy2log[layer] = self.transfer.phy2log[layer]
                    self._refresh_split()
        if not self.transfer.layers:
            self.phy2log = self.transfer.phy2log
            self._refresh_split()
            self.transfer = None
            self.plan_log[-1]["popularity_at_apply"] = self.expected_imbalance()
        return cost
