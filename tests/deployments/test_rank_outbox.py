"""A rank's output frames stay within the ingress's size bound (deployments/rank_outbox.py): a batch that
does not fit goes as several payloads, a long text chunk split in two, with the same chunks, text and
token ids arriving in the same order; a batch that fits is one payload, as encoded before."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from deployments.rank_outbox import fitting_payloads, halves, split_chunk

encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
STATS = {"running": 3, "waiting": 0, "step": 9}


def _chunk(text: str, ids: list[int], finish: str | None = None) -> dict[str, Any]:
    return {"text": text, "token_ids": ids, "finish_reason": finish}


def _delivered(payloads: list[bytes]) -> dict[str, dict[str, Any]]:
    """Per request: its text, token ids and finish reasons, as the ingress would put them together."""
    out: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        batch, stats = decode(payload)
        assert stats == STATS  # every frame carries the rank's stats
        for request_id, chunk in batch:
            seen = out.setdefault(request_id, {"text": "", "token_ids": [], "finishes": []})
            seen["text"] += chunk.get("text", "")
            seen["token_ids"] += chunk.get("token_ids", [])
            seen["finishes"].append(chunk.get("finish_reason"))
    return out


def test_a_split_chunk_carries_the_same_text_and_tokens_and_ends_as_the_chunk_did() -> None:
    first, second = split_chunk(_chunk("héllo wörld", [1, 2, 3, 4, 5], "stop"))
    assert first["text"] + second["text"] == "héllo wörld"
    assert first["token_ids"] + second["token_ids"] == [1, 2, 3, 4, 5]
    assert (first["finish_reason"], second["finish_reason"]) == (None, "stop")
    assert split_chunk(_chunk("ab", [7])) == (_chunk("a", []), _chunk("b", [7]))


@pytest.mark.parametrize(
    "chunk",
    [_chunk("a", [1]), _chunk("", []), {"prompt_tokens": 5, "rank": 0}, {"error": "x" * 100, "status": 400}],
)
def test_small_and_non_text_chunks_are_not_split(chunk: dict[str, Any]) -> None:
    assert split_chunk(chunk) is None
    assert halves([("r", chunk)]) is None
    assert halves([]) is None


def test_a_batch_that_fits_is_one_payload_as_before() -> None:
    batch = [("r1", _chunk("a", [1])), ("r2", _chunk("b", [2], "length"))]
    assert list(fitting_payloads(encode, batch, STATS, 1 << 20)) == [encode((batch, STATS))]


def test_a_large_batch_goes_as_payloads_within_the_bound_in_order() -> None:
    # 300 requests, each with a first chunk and a run of one-token chunks: a stalled ingress's backlog.
    batch = []
    for step in range(20):
        for r in range(300):
            chunk = {"prompt_tokens": 4, "rank": 0} if step == 0 else _chunk(f"t{step}-", [step], None)
            batch.append((f"cmpl-{r:04d}", chunk))
    max_bytes = 4096
    payloads = list(fitting_payloads(encode, batch, STATS, max_bytes))
    assert len(payloads) > 1 and all(len(p) <= max_bytes for p in payloads)
    ordered = [item for p in payloads for item in decode(p)[0]]
    assert ordered == [list(item) for item in batch]  # every chunk, in the order queued, none split


def test_a_chunk_longer_than_the_bound_is_split_until_it_fits() -> None:
    text = "ü" * 20_000  # 40 kB of UTF-8
    batch = [("small", _chunk("x", [1])), ("big", _chunk(text, list(range(5000)), "stop"))]
    payloads = list(fitting_payloads(encode, batch, STATS, 4096))
    assert all(len(p) <= 4096 for p in payloads)
    got = _delivered(payloads)
    assert got["big"]["text"] == text and got["big"]["token_ids"] == list(range(5000))
    assert got["big"]["finishes"][-1] == "stop" and set(got["big"]["finishes"][:-1]) == {None}
    assert got["small"] == {"text": "x", "token_ids": [1], "finishes": [None]}


def test_a_chunk_that_cannot_be_split_goes_as_it_is() -> None:
    batch = [("r", {"error": "e" * 200, "status": 500})]
    assert list(fitting_payloads(encode, batch, STATS, 64)) == [encode((batch, STATS))]
