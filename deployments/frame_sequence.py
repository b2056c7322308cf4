"""Numbered frames on the serving path's ZMQ channels (ranks -> ingress output, ingress -> rank
requests): how a frame carries its number, and the receiver's check of the numbers.

A frame is `FrameAuth.seal(SEQ + payload)` (scheduler/frame_auth.py): the number is inside the
sealed part, so a stranger can neither forge nor renumber one. Each sender numbers its frames 0, 1,
2, ... on one connection; the receiver keeps one `FrameSequence` per sender.
"""

from __future__ import annotations

import struct

from scheduler.frame_auth import FrameAuth

# A frame's sequence number, before its msgpack payload (inside the sealed part).
SEQ = struct.Struct("<Q")


def seal_numbered(auth: FrameAuth, seq: int, payload: bytes) -> bytes:
    """Frame number `seq` carrying `payload`, sealed with `auth`'s key."""
    return auth.seal(SEQ.pack(seq) + payload)


def open_numbered(auth: FrameAuth, frame: bytes) -> tuple[int, memoryview] | None:
    """(number, payload) of a frame sealed with `auth`'s key; None if it does not verify or is too
    short to hold a number."""
    body = auth.open(frame)
    if body is None or len(body) < SEQ.size:
        return None
    (seq,) = SEQ.unpack_from(body)
    return seq, memoryview(body)[SEQ.size :]


class FrameSequence:
    """The numbers of one sender's frames as they arrive. A number below the next one expected is a
    replay of a frame already taken; a number above it means the frames in between were lost (sent,
    never received: ZMQ does not reorder a connection's frames)."""

    def __init__(self) -> None:
        self.expected = 0  # the next frame's number
        self.lost = 0  # frames skipped so far

    def take(self, seq: int) -> int | None:
        """Frame `seq` arrived intact: None if it is a replay (drop it), else how many frames before
        it were lost (0 normally). Only a frame that is acted on may be taken."""
        if seq < self.expected:
            return None
        missing = seq - self.expected
        self.lost += missing
        self.expected = seq + 1
        return missing
