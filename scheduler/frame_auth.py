"""Per-frame authentication of dpserve's internal ZMQ sockets: HMAC-SHA256 with a per-group key.

Two channels use it: each rank's output PUSH socket to the ingress's PULL socket
(deployments/output_channel.py, deployments/rank_outbox.py) and the ranks' gate DEALER sockets to the
balance coordinator's ROUTER socket (scheduler/gate_transport.py). The key is random per DP group,
made by the ingress and handed to the ranks and the coordinator through Ray calls, never through a
socket. A frame is `tag || payload` with `tag = HMAC-SHA256(key, payload)`; a frame whose tag does not
verify is dropped unread (and counted by its receiver).

Why an HMAC and not ZMQ's CURVE: CURVE needs a libzmq built with libsodium (not every pyzmq wheel or
distribution package has it) plus a key pair per socket, and encrypts what these channels do not need
hidden (token ids and load counts inside one cluster). One HMAC over a 100-byte gate report costs a
few microseconds on the engine-core thread with warm caches (tens right after a forward pass), with the
standard library only. What it does not give:
confidentiality, and protection against an on-path attacker replaying a frame verbatim (the output
channel's sequence numbers refuse replays there; a replayed gate report only repeats counts a rank
already sent).

Pure module (standard library only): the engine-core scheduler imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_BYTES = 32
TAG_BYTES = hashlib.sha256().digest_size  # 32


def new_key() -> bytes:
    """A fresh random key (one per DP group)."""
    return secrets.token_bytes(KEY_BYTES)


class FrameAuth:
    """Seals and opens frames with one key."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError("a frame key is at least 16 random bytes")
        self.key = key

    def seal(self, payload: bytes) -> bytes:
        return hmac.digest(self.key, payload, "sha256") + payload

    def open(self, frame: bytes) -> bytes | None:
        """The payload of an authentic frame, else None (too short, or the tag does not verify)."""
        if len(frame) < TAG_BYTES:
            return None
        tag, payload = frame[:TAG_BYTES], frame[TAG_BYTES:]
        return payload if hmac.compare_digest(tag, hmac.digest(self.key, payload, "sha256")) else None
