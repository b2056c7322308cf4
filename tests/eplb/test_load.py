"""LoadWindow (a ring buffer of per-step expert counts) and DecayingLoad (recency-weighted counts)."""

from __future__ import annotations

import numpy as np
import pytest

from eplb.load import DecayingLoad, LoadWindow, decay_factor


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


# --- DecayingLoad -----------------------------------------------------------------------------------


def test_decay_factor_halves_per_half_life() -> None:
    assert decay_factor(0.0, 5.0) == 1.0
    assert decay_factor(5.0, 5.0) == pytest.approx(0.5)
    assert decay_factor(15.0, 5.0) == pytest.approx(0.125)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="half_life_s"):
            decay_factor(1.0, bad)
    with pytest.raises(ValueError, match="dt_s"):
        decay_factor(-0.1, 5.0)


def test_decaying_load_weighs_by_age() -> None:
    d = DecayingLoad(2, 3, half_life_s=10.0)
    d.add(step(8))
    d.advance(10.0)  # the 8 is now one half-life old
    d.add(step(1))
    d.advance(20.0)  # 8 -> 3 half-lives, 1 -> 2 half-lives
    assert np.allclose(d.total(), step(8 / 8 + 1 / 4))
    # Splitting the same time into many small steps gives the same weights (exponential decay).
    e = DecayingLoad(2, 3, half_life_s=10.0)
    e.add(step(8))
    for _ in range(100):
        e.advance(0.1)
    e.add(step(1))
    for _ in range(4):
        e.advance(5.0)
    assert np.allclose(e.total(), d.total())


def test_decaying_load_tracks_a_change_sooner_than_a_window() -> None:
    # Expert 0 is hot for 100 steps, then expert 2: the recency-weighted load already ranks expert 2
    # first 20 steps after the change, a 100-step window does not.
    hot0, hot2 = np.array([[3.0, 1.0, 1.0]]), np.array([[1.0, 1.0, 3.0]])
    w, d = LoadWindow(1, 3, window_steps=100), DecayingLoad(1, 3, half_life_s=5.0)
    for i in range(120):
        counts = hot0 if i < 100 else hot2
        w.add(counts)
        d.advance(1.0)
        d.add(counts)
    assert w.total().argmax() == 0
    assert d.total().argmax() == 2


def test_decaying_load_validates_and_copies() -> None:
    with pytest.raises(ValueError, match="positive sizes"):
        DecayingLoad(0, 3, 1.0)
    with pytest.raises(ValueError, match="half_life_s"):
        DecayingLoad(2, 3, 0.0)
    d = DecayingLoad(2, 3, 1.0)
    with pytest.raises(ValueError, match="shape"):
        d.add(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        d.add(step(-1))
    d.add(np.arange(6, dtype=np.int32).reshape(2, 3))
    t = d.total()
    t[:] = -1
    assert d.total().tolist() == [[0, 1, 2], [3, 4, 5]]
    d.reset()
    assert not d.total().any()
