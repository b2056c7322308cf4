"""Expert routing (skewed, drifting), expert placement over the EP ranks, and EPLB re-placement.

Only ``sim_layers`` representative MoE layers are simulated (their costs are scaled up to the model's
layer count in `costs`): the per-step work is then independent of the layer count, which is what makes
64 ranks x 10,000 requests run in seconds. Each layer has its own popularity, so layer-to-layer
variation in imbalance is kept.

Placement uses the EPLB package's conventions: ``phy2log [layers, num_ranks * slots_per_rank]`` with
rank r owning slots ``r * S .. (r + 1) * S - 1``; a token for an expert with k replicas is split
evenly over them (vLLM picks replicas by token position, so the split is even in expectation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cluster.sim.config import EplbConfig, ExpertConfig, ModelConfig


def default_phy2log(layers: int, num_experts: int, num_redundant: int) -> np.ndarray:
    """Start-up placement: expert i in slot i, redundant slot E + j holding expert j % E.

    Identical to `eplb.policies.default_placement`, repeated here so the simulator runs without EPLB.
    """
    row = np.arange(num_experts + num_redundant, dtype=np.int64) % num_experts
    return np.tile(row, (layers, 1))


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
    layer_costs: list[float]  # seconds each remaining layer's move adds to the step carrying it


class ExpertModel:
    """Draws per-step expert loads, keeps the placement, and runs EPLB on its cadence."""

    def __init__(
        self,
        model: ModelConfig,
        experts: ExpertConfig,
        eplb: EplbConfig,
        num_ranks: int,
        rng: np.random.Generator,
        transfer_cost_per_slot: float,
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
        self.logits = rng.normal(0.0, experts.skew_sigma, size=(self.L, self.E))
        self._probs = self._softmax(self.logits)
        self.eplb = eplb
        self._rebalance = None
        if eplb.policy != "none":
            policies, self._rebalance = _load_eplb()
            if eplb.policy not in policies:
                raise ValueError(
                    f"eplb.policy {eplb.policy!r} unknown; choose from {sorted(policies)} or none"
                )
        self.phy2log = default_phy2log(self.L, self.E, self.num_redundant)
        self._refresh_split()
        self.window = np.zeros((self.L, self.E))
        self.transfer: Transfer | None = None
        self.transfer_cost_per_slot = transfer_cost_per_slot
        self.rebalances = 0  # accepted plans
        self.moved_slots = 0  # slots moved over all simulated layers
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

    def drift(self, dt: float) -> None:
        """Advance the log-popularities by ``dt`` seconds of an Ornstein-Uhlenbeck process."""
        if dt <= 0 or self.sigma == 0 or math.isinf(self.tau):
            return
        a = math.exp(-dt / self.tau)
        # Exact OU update: stationary std stays skew_sigma whatever the step length.
        self.logits = a * self.logits + self.sigma * math.sqrt(1 - a * a) * self.rng.normal(
            size=self.logits.shape
        )
        self._probs = self._softmax(self.logits)

    def route(self, total_tokens: int) -> np.ndarray:
        """Per-layer, per-logical-expert routed (token, expert) counts for a step: float [L, E]."""
        if total_tokens == 0:
            return np.zeros((self.L, self.E))
        loads = self.rng.poisson(total_tokens * self.top_k * self._probs).astype(np.float64)
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
            or step == 0
            or step % self.eplb.interval_steps
            or self.transfer is not None
        ):
            return
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
        # A rank receives the weights of each of its slots whose expert changed; the busiest receiver
        # sets the transfer time of a layer.
        per_rank = changed.reshape(self.L, self.R, self.S).sum(axis=2).max(axis=1)  # [L]
        self.moved_slots += int(changed.sum())
        self.rebalances += 1
        # Each simulated layer stands for layer_scale real layers: one real layer moves per step.
        costs = []
        for layer in range(self.L):
            costs += [self.transfer_cost_per_slot * float(per_rank[layer])] * round(self.layer_scale)
        if self.eplb.mode == "sync":
            costs = [sum(costs)]
        self.transfer = Transfer(phy2log=new, layer_costs=costs)

    def transfer_step(self) -> float:
        """Seconds of weight transfer that this step carries; applies the placement when done."""
        if self.transfer is None:
            return 0.0
        cost = self.transfer.layer_costs.pop(0)
        if not self.transfer.layer_costs:
            self.phy2log = self.transfer.phy2log
            self._refresh_split()
            self.transfer = None
        return cost
