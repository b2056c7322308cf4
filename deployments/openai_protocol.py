"""The OpenAI request models dpserve accepts, their sampling parameters, and OpenAI-style errors.

Fields dpserve honours are declared with their types and ranges; fields OpenAI or vLLM define that
dpserve does not implement (`UNSUPPORTED`) are rejected with a 400 naming the field when set to
anything but their default; other unknown fields are ignored, as vLLM's server does. `check` adds
the cheap semantic checks vLLM's SamplingParams would make on the rank (min_tokens > max_tokens,
empty or oversized stop strings, lone surrogates), so such a request never reaches an engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.request_errors import RequestRejected, clean_message

__all__ = ["RequestRejected"]

# A request may not ask for more than this many new tokens whatever the model's context: a bound
# that keeps a hostile request from tying a rank up (the rank also checks the model's context).
MAX_TOKENS_LIMIT = 1 << 20
# Stop strings: vLLM holds back up to the longest one's length of output text on every step, so an
# unbounded one costs each step of that request its length in string work.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1024
# Integers that reach the engine's int32/int64 tensors (top_k) stay in int32.
INT32_MAX = 2**31 - 1

# Fields of OpenAI's (or vLLM's) API that dpserve does not implement, with the values that mean
# "not asked for": any other value is a 400 naming the field rather than a silently different answer.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "prompt_logprobs": (None,),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "suffix": (None, ""),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "logits_processors": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # Unknown fields are kept (not used) so that `check` can name the unsupported ones.
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool | None = False  # null as vLLM takes it: the default
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return v

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        """Plain sampling parameters for the rank (None values left to vLLM's defaults)."""
        out: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": self.ignore_eos}
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "min_tokens"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop is not None:
            out["stop"] = self.stop_list()
        if out["max_tokens"] is None:
            del out["max_tokens"]
        return out

    def check(self, max_model_len: int, max_prompt_chars: int) -> None:
        """Raise RequestRejected (naming the field) for what the rank or vLLM would reject anyway and
        for fields dpserve does not implement. `max_model_len` 0: not known yet (no checks of it)."""
        extra = self.model_extra or {}
        for name, defaults in UNSUPPORTED.items():
            if name in extra and not any(extra[name] == d and type(extra[name]) is type(d) for d in defaults):
                raise RequestRejected(f"{name!r} is not supported by this server", param=name)
        if self.n not in (None, 1):
            raise RequestRejected("n must be 1: this server returns one choice per request", param="n")
        for stop in self.stop_list():
            if not stop:
                raise RequestRejected("stop sequences must not be empty", param="stop")
            if len(stop) > MAX_STOP_CHARS:
                raise RequestRejected(
                    f"a stop sequence may have at most {MAX_STOP_CHARS} characters", param="stop"
                )
            if _has_lone_surrogate(stop):
                raise RequestRejected("stop is not valid Unicode (lone surrogate)", param="stop")
        limit = self.limit()
        if self.min_tokens is not None and limit is not None and self.min_tokens > limit:
            raise RequestRejected(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({limit})", param="min_tokens"
            )
        if max_model_len > 0:
            # The prompt takes at least one token of the context.
            for name, value in (("max_tokens", limit), ("min_tokens", self.min_tokens)):
                if value is not None and value >= max_model_len:
                    raise RequestRejected(
                        f"{name}={value} leaves no room for the prompt in this model's maximum context "
                        f"length of {max_model_len} tokens",
                        param=name,
                    )

    def limit(self) -> int | None:
        return getattr(self, "max_tokens", None)


def _check_text(text: str, param: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise RequestRejected(
            f"the {param} has {len(text)} characters; this server takes at most {max_chars}", param=param
        )
    if _has_lone_surrogate(text):
        raise RequestRejected(f"the {param} is not valid Unicode (lone surrogate)", param=param)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: bool | None = False

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            p = p[0]
        return p

    def check(self, max_model_len: int, max_prompt_chars: int) -> None:
        super().check(max_model_len, max_prompt_chars)
        try:
            prompt = self.single_prompt()
        except ValueError as exc:
            raise RequestRejected(str(exc), param="prompt") from None
        if isinstance(prompt, str):
            _check_text(prompt, "prompt", max_prompt_chars)
        else:
            if any(t < 0 or t > INT32_MAX for t in prompt):
                raise RequestRejected("prompt token ids must be non-negative token ids", param="prompt")
            if max_model_len > 0 and len(prompt) >= max_model_len:
                raise RequestRejected(
                    f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                    f"{len(prompt)}",
                    param="prompt",
                )
        if not prompt:
            raise RequestRejected("the prompt is empty", param="prompt")
        if self.echo and (self.stream or not isinstance(prompt, str)):
            raise RequestRejected("echo is supported only for a text prompt without stream", param="echo")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self, max_model_len: int, max_prompt_chars: int) -> None:
        super().check(max_model_len, max_prompt_chars)
        try:
            messages = self.plain_messages()
        except ValueError as exc:
            raise RequestRejected(str(exc), param="messages") from None
        _check_text("".join(m["content"] for m in messages), "messages", max_prompt_chars)


def error_body(message: str, status: int, err_type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    default_type = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                    422: "invalid_request_error",
                    429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")  # fmt: skip
    return {
        "error": {
            "message": clean_message(message),
            "type": err_type or default_type,
            "param": param,
            "code": code or status,
        }
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def now() -> int:
    return int(time.time())
