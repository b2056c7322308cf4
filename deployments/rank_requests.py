"""Turning an API request into what a rank's engine takes: prompt token ids and sampling params.

Requests this model cannot take raise RequestRejected (an HTTP 4xx at the ingress).
"""

from __future__ import annotations

from typing import Any

from deployments.request_errors import RequestRejected


def prompt_token_ids(
    tokenizer: Any, prompt: str | list[int] | None, messages: list[dict] | None
) -> list[int]:
    if messages is not None:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # malformed roles/contents the template cannot render
            raise RequestRejected(f"cannot apply the chat template: {exc}", param="messages") from None
        # The template already holds the special tokens it needs.
        return list(tokenizer.encode(text, add_special_tokens=False))
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    raise RequestRejected("prompt must be a string or a list of token ids", param="prompt")


def sampling_params(params: dict[str, Any], prompt_len: int, max_model_len: int):
    """vLLM SamplingParams (delta outputs) for a prompt of `prompt_len` tokens."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    limit = max_model_len
    if prompt_len == 0:
        raise RequestRejected("the prompt is empty", param="prompt")
    if prompt_len >= limit:
        raise RequestRejected(
            f"this model's maximum context length is {limit} tokens; the prompt has {prompt_len}",
            param="prompt",
        )
    params = dict(params)
    max_tokens = params.pop("max_tokens", None)
    room = limit - prompt_len
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise RequestRejected(
            f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the maximum "
            f"context length {limit}",
            param="max_tokens",
        )
    try:
        return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **params)
    except (TypeError, ValueError) as exc:
        raise RequestRejected(str(exc)) from None
