"""The numbered frames both serving-path channels use (deployments/frame_sequence.py): a frame's number
travels sealed with it, and the receiver's check tells an in-order frame, a replay and a gap apart."""

from __future__ import annotations

import pytest

from deployments.frame_sequence import SEQ, FrameSequence, open_numbered, seal_numbered
from scheduler.frame_auth import FrameAuth, new_key


def test_frames_in_order_lose_nothing() -> None:
    sequence = FrameSequence()
    assert [sequence.take(n) for n in range(5)] == [0] * 5
    assert (sequence.expected, sequence.lost) == (5, 0)


def test_a_gap_counts_the_frames_skipped_and_later_frames_follow_on() -> None:
    sequence = FrameSequence()
    assert sequence.take(0) == 0
    assert sequence.take(3) == 2  # frames 1 and 2 never arrived
    assert sequence.take(4) == 0
    assert sequence.take(10) == 5
    assert (sequence.expected, sequence.lost) == (11, 7)


@pytest.mark.parametrize("seq", [0, 1, 2])
def test_a_number_already_taken_is_a_replay_and_changes_nothing(seq: int) -> None:
    sequence = FrameSequence()
    for n in (0, 1, 2):
        sequence.take(n)
    assert sequence.take(seq) is None
    assert (sequence.expected, sequence.lost) == (3, 0)


def test_a_frame_skipped_over_and_arriving_late_is_a_replay() -> None:
    sequence = FrameSequence()
    assert sequence.take(2) == 2  # frames 0 and 1 count as lost ...
    assert sequence.take(1) is None  # ... and cannot be taken afterwards
    assert sequence.lost == 2


def test_the_number_travels_sealed_with_the_payload() -> None:
    auth = FrameAuth(new_key())
    frame = seal_numbered(auth, 7, b"payload")
    seq, payload = open_numbered(auth, frame)
    assert (seq, bytes(payload)) == (7, b"payload")
    assert open_numbered(FrameAuth(new_key()), frame) is None  # another key
    assert open_numbered(auth, b"garbage") is None  # no tag
    assert open_numbered(auth, auth.seal(b"\x01" * (SEQ.size - 1))) is None  # authentic, too short
    renumbered = frame[: -len(b"payload") - SEQ.size] + SEQ.pack(8) + b"payload"
    assert open_numbered(auth, renumbered) is None  # the number is covered by the tag
