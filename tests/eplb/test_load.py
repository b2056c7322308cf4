"""LoadWindow: a ring buffer of per-step expert counts."""

from __future__ import annotations

import numpy as np
import pytest

from eplb.load import LoadWindow


def step(value: float) -> np.ndarray:
    return np.full((2, 3), value)


def test_window_keeps_last_steps() -> None:
    w = LoadWindow(2, 3, window_steps=3)
    assert w.steps_recorded == 0 and not w.is_complete()
    assert np.array_equal(w.total(), np.zeros((2, 3)))
    for v in (1, 2, 3):
        w.add(step(v))
    assert w.is_complete() and w.steps_recorded == 3
    assert np.array_equal(w.total(), step(6))
    w.add(step(10))  # evicts the 1
    w.add(step(100))  # evicts the 2
    assert w.steps_recorded == 3
    assert np.array_equal(w.total(), step(113))


def test_int_counts_and_copy_semantics() -> None:
    w = LoadWindow(2, 3, window_steps=2)
    counts = np.arange(6, dtype=np.int32).reshape(2, 3)
    w.add(counts)
    counts[:] = 99  # the window must have copied
    total = w.total()
    assert total.dtype == np.float64
    assert total.tolist() == [[0, 1, 2], [3, 4, 5]]
    total[:] = -1  # and hand out a copy
    assert w.total().tolist() == [[0, 1, 2], [3, 4, 5]]


def test_reset() -> None:
    w = LoadWindow(2, 3, window_steps=2)
    w.add(step(5))
    w.add(step(5))
    w.reset()
    assert w.steps_recorded == 0 and not w.is_complete()
    assert w.total().sum() == 0
    w.add(step(1))
    assert np.array_equal(w.total(), step(1))


def test_float_drift_is_bounded() -> None:
    rng = np.random.default_rng(0)
    w = LoadWindow(2, 3, window_steps=7)
    steps = [rng.random((2, 3)) * 1e6 for _ in range(1000)]
    for s in steps:
        w.add(s)
    np.testing.assert_allclose(w.total(), np.sum(steps[-7:], axis=0), rtol=1e-12)
    assert (w.total() >= 0).all()


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((3, 2)), "shape"),
        (np.zeros(6), "shape"),
        (np.full((2, 3), -1.0), "non-negative"),
        (np.full((2, 3), np.nan), "finite"),
        (np.full((2, 3), "x"), "numeric"),
    ],
)
def test_add_rejects_bad_steps(bad: np.ndarray, match: str) -> None:
    w = LoadWindow(2, 3, window_steps=2)
    with pytest.raises(ValueError, match=match):
        w.add(bad)
    assert w.steps_recorded == 0


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        LoadWindow(0, 3, 2)
    with pytest.raises(ValueError):
        LoadWindow(2, 3, 0)
