"""benchmarks/eplb_cluster.py's per-rank max/mean: measured from per-physical-slot counts against the
logical estimate (even split over replicas) and its bound."""

from __future__ import annotations

import numpy as np

from benchmarks.eplb_cluster import max_over_mean, max_over_mean_bound, measured_max_over_mean
from eplb.stats import logical_from_slots

# 2 layers, 4 experts; 2 ranks.
NO_REPLICAS = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
# Rank 0 holds slots 0-2 (experts 0, 1, 0), rank 1 slots 3-5 (experts 2, 3, 1): expert 1 spans both ranks.
SPANNING = np.array([[0, 1, 0, 2, 3, 1]] * 2)


def test_measured_equals_logical_without_replicas():
    slots = np.array([[5, 1, 1, 1], [2, 2, 3, 1]])
    load = logical_from_slots(slots, NO_REPLICAS, 4)
    assert (
        measured_max_over_mean(slots)
        == max_over_mean(load, NO_REPLICAS)
        == max_over_mean_bound(load, NO_REPLICAS)
    )
    assert measured_max_over_mean(slots) == (6 + 4) / (4 + 4)


def test_measured_sees_an_uneven_split_the_logical_estimate_cannot():
    # Expert 1 (slots 1 on rank 0 and 5 on rank 1) sends all its tokens to slot 1 in layer 0.
    slots = np.array([[1, 6, 1, 1, 1, 0], [1, 3, 1, 1, 1, 3]])
    load = logical_from_slots(slots, SPANNING, 4)
    assert (load == [[2, 6, 1, 1], [2, 6, 1, 1]]).all()
    estimate = max_over_mean(load, SPANNING)
    measured = measured_max_over_mean(slots)
    bound = max_over_mean_bound(load, SPANNING)
    assert estimate == 1.0  # the even split of expert 1 (3 per replica) gives each rank 5 in each layer
    assert measured == (8 + 5) / (5 + 5)  # layer 0: rank 0 ran 8 of 10
    assert estimate <= measured <= bound
