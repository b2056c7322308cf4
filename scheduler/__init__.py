"""Balance scheduling: the DP prefill gate that keeps data-parallel ranks' batches even.

``balance_scheduler`` (vLLM scheduler subclasses that apply the gate in each engine core),
``coordinator`` (the actor that freezes one decision per lockstep step for every rank; its
configuration store in ``coordinator_config`` and its Ray metrics in ``coordinator_metrics``),
``gate_transport`` (the ZMQ channel between them), ``gate_report`` (the plain data they exchange),
``policy`` (the pure gate policies) and ``step_trace`` (per-step rows for benchmarks).
Imports point one way: ``balance_scheduler`` -> ``gate_transport`` -> ``gate_report``;
``coordinator`` -> ``coordinator_config``, ``coordinator_metrics``, ``gate_transport``, ``policy``,
``gate_report`` (the two ``coordinator_*`` modules import nothing of ``scheduler``).
"""
