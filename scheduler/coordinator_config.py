"""The balance coordinator's configuration kept in the GCS key-value store across actor restarts.

One concern: saving and reading back the policy, its params, the timeout, the gate-frame key and the
loopback binding of one ``BalanceCoordinator`` actor (``scheduler/coordinator.py``), so that a
restarted actor keeps what was set at run time instead of its creation arguments.
"""

from __future__ import annotations

import json
import logging
from typing import Any

# The coordinator's logger: these messages are about the coordinator's configuration.
logger = logging.getLogger("dpserve.balance.coordinator")


class ConfigStore:
    """The coordinator's configuration in the GCS key-value store, for the actor's restarts.

    Why here: Ray re-runs ``__init__`` with the creation arguments, so anything set later lives only
    in the dead process. The ranks cannot re-assert it (they never see ``set_policy``: operators and
    benchmarks call the actor directly), and a second actor to hold it could die too. The GCS outlives
    any actor (Ray Serve's controller recovers its own state from the same store). One key per actor
    name (or id, if unnamed); the value carries the actor id, so a *new* actor created under the same
    name later (a new rank group) starts from its own arguments, never from a predecessor's leftovers.
    """

    KV_NAMESPACE = "dpserve"

    def __init__(self, key: str, actor_id: str) -> None:
        self.key, self.actor_id = key, actor_id

    @classmethod
    def for_this_actor(cls) -> ConfigStore | None:
        """The store of the calling actor; None outside a Ray actor (plain tests)."""
        try:
            import ray

            if not ray.is_initialized():
                return None
            ctx = ray.get_runtime_context()
            actor_id = ctx.get_actor_id()
            if actor_id is None:
                return None
            name = ctx.get_actor_name() or actor_id
            return cls(f"balance_coordinator/{ctx.namespace}/{name}", actor_id)
        except Exception:  # pragma: no cover - no Ray runtime
            return None

    def load(self) -> dict[str, Any] | None:
        """The configuration this same actor (id) saved before a restart, if any."""
        from ray.experimental import internal_kv

        try:
            raw = internal_kv._internal_kv_get(self.key, namespace=self.KV_NAMESPACE)
        except Exception:
            logger.warning("balance coordinator: cannot read the saved configuration", exc_info=True)
            return None
        if not raw:
            return None
        saved = json.loads(raw)
        return saved if saved.get("actor_id") == self.actor_id else None

    def save(
        self, policy: str, params: dict[str, Any], timeout_s: float, key: bytes, local_only: bool
    ) -> None:
        from ray.experimental import internal_kv

        # The frame key too: a restarted actor must accept the group's ranks. The GCS store is no
        # less protected than the Ray calls that hand the key out.
        value = {"actor_id": self.actor_id, "policy": policy, "params": params, "timeout_s": timeout_s,
                 "key": key.hex(), "local_only": local_only}  # fmt: skip
        try:
            internal_kv._internal_kv_put(self.key, json.dumps(value), namespace=self.KV_NAMESPACE)
        except Exception:  # the change itself is applied; only a restart would lose it
            logger.warning("balance coordinator: cannot save the configuration", exc_info=True)
