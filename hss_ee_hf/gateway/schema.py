"""The OpenAI request bodies the gateway accepts, validated strictly, and the generation settings they map to.

`openai`'s own request types are `TypedDict`s for type checkers, not validators, so the two request bodies are
pydantic models here. They are strict on purpose: an unknown field, or a supported field with a value the gateway
cannot honour (`n=2`, `logprobs=true`, tools), is a 400 naming the field rather than a silently different answer.
Fields that change nothing about the output (`user`, `metadata`) are accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .wire import GatewayError

MAX_STOP_STRINGS = 4  # as OpenAI's API

# Fields accepted only with these values (what OpenAI does when they are absent).
_ONLY = {
    "n": (None, 1),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "tool_calls": (None, []),
    "audio": (None,),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "store": (None, False),
    "reasoning_effort": (None,),
}


def _only_default(value: Any, field: str) -> Any:
    if value not in _ONLY[field]:
        allowed = " or ".join(json.dumps(v) for v in _ONLY[field] if v is not None) or "null"
        raise ValueError(f"the hss-ee gateway does not support {field}={json.dumps(value)} (only {allowed})")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: what the request asked for, in transformers' terms.

    Args:
        max_tokens (`int`, *optional*): most new tokens; `None` lets the gateway choose (its default, capped by the
            context window).
        temperature (`float`, *optional*): `None` or `0` decode greedily, exactly as the plaintext model's greedy
            `generate()`; above 0 samples.
        top_p (`float`, *optional*): nucleus filtering when sampling.
        stop (`tuple[str, ...]`): strings that end the output (not included in it).
        seed (`int`, *optional*): seeds torch's generator before a sampled generation.
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature is not None and self.temperature > 0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # nothing to obfuscate on loopback; accepted and ignored


class _Request(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted for compatibility; never stored or logged

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n", "frequency_penalty", "presence_penalty", "logit_bias")
    @classmethod
    def _check_unsupported(cls, value: Any, info) -> Any:
        return _only_default(value, info.field_name)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens, self.temperature, self.top_p, stop, self.seed)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    """A part of a message's content; only `{"type": "text", "text": ...}` is supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only text content parts are supported, not {value!r}")
        return value


class ChatMessage(BaseModel):
    """One chat message. Tool and function messages are refused (the gateway offers no tools); the empty fields an
    assistant message from an earlier response carries are accepted, so a conversation can be sent back as is."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _check_unsupported(cls, value: Any, info) -> Any:
        return _only_default(value, info.field_name)

    def for_template(self) -> dict[str, str]:
        """`{"role", "content"}` as chat templates expect (`developer` is the newer name of `system`)."""
        if isinstance(self.content, list):
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator(
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "modalities",
        "audio",
        "store",
        "reasoning_effort",
    )
    @classmethod
    def _check_chat_unsupported(cls, value: Any, info) -> Any:
        return _only_default(value, info.field_name)

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]

    def params(self) -> SamplingParams:
        return self.sampling(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Request):
    """The body of `POST /v1/completions` (one prompt: a string or a list of token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"one prompt per request, not {len(value)} (send them as separate requests)")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt has no tokens")
        return value

    @field_validator("suffix", "best_of", "logprobs")
    @classmethod
    def _check_completion_unsupported(cls, value: Any, info) -> Any:
        return _only_default(value, info.field_name)

    def params(self) -> SamplingParams:
        return self.sampling(self.max_tokens)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_field(part: str | int) -> bool:
    """Whether a pydantic error location part names a field or an index (not a union member such as `list[int]`)."""
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


def parse_request(model: type[_Request], raw: bytes) -> Any:
    """Parses and validates a request body.

    Raises:
        `GatewayError`: 400 for a body that is not a JSON object and 422 for a field that is missing, unknown or
            out of range (`param` names it).
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GatewayError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        # A union field reports one error per member; the deepest says most (a content part's `type`, not "str").
        first = max(err.errors(), key=lambda e: len([p for p in e["loc"] if _is_field(p)]))
        param = ".".join(str(part) for part in first["loc"] if _is_field(part))
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}; docs/gateway.md lists the fields the hss-ee gateway supports"
        else:
            message = f"invalid field {param!r}: {first['msg'].removeprefix('Value error, ')}"
        raise GatewayError(422, message, param=param or None) from None
