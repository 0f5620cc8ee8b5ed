"""What the gateway sends: OpenAI's own response types, server-sent-event framing and OpenAI-style errors.

Responses are built from the `openai` package's pydantic models (`ChatCompletion`, `ChatCompletionChunk`,
`Completion`, `Model`, `CompletionUsage`), so a field the official client cannot parse fails here, in the gateway's
tests, rather than in a user's application.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import BaseModel

FinishReason = Literal["stop", "length"]
DONE = "data: [DONE]\n\n"


class GatewayError(Exception):
    """An error the gateway answers with an OpenAI-style body: `{"error": {message, type, param, code}}`.

    Args:
        status (`int`): the HTTP status.
        message (`str`): what was wrong and what to do.
        type (`str`, *optional*, defaults to `"invalid_request_error"`): OpenAI's error type.
        param (`str`, *optional*): the request field at fault.
        code (`str`, *optional*): a machine-readable code, e.g. `"model_not_found"`.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        """The JSON body OpenAI's API sends with an error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    """A fresh response id such as `chatcmpl-3f2a...` (random, so ids say nothing about the traffic)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def model_card(model_id: str, created: int) -> Model:
    return Model(id=model_id, created=created, object="model", owned_by="hss-ee")


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created).model_dump(exclude_unset=True)]}


def chat_completion(
    rid: str, created: int, model: str, text: str, finish_reason: FinishReason, use: CompletionUsage
) -> ChatCompletion:
    message = ChatCompletionMessage(role="assistant", content=text)
    choice = ChatChoice(index=0, message=message, finish_reason=finish_reason, logprobs=None)
    return ChatCompletion(id=rid, created=created, model=model, object="chat.completion", choices=[choice], usage=use)


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    *,
    role: bool = False,
    content: str | None = None,
    finish_reason: FinishReason | None = None,
    use: CompletionUsage | None = None,
) -> ChatCompletionChunk:
    """One streamed chat chunk. With `use` (and nothing else) it is the final usage chunk, whose `choices` is
    empty, as OpenAI sends it for `stream_options={"include_usage": true}`."""
    if use is not None:
        return ChatCompletionChunk(
            id=rid, created=created, model=model, object="chat.completion.chunk", choices=[], usage=use
        )
    delta = ChoiceDelta(role="assistant", content="") if role else ChoiceDelta(content=content)
    if finish_reason is not None:
        delta = ChoiceDelta()
    choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason, logprobs=None)
    return ChatCompletionChunk(id=rid, created=created, model=model, object="chat.completion.chunk", choices=[choice])


def completion(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: FinishReason | None,
    use: CompletionUsage | None = None,
    *,
    choices: bool = True,
) -> Completion:
    """A text completion, or one streamed chunk of it (`finish_reason=None` until the last)."""
    if finish_reason is None:  # a streamed chunk: the type's finish_reason is not optional, so set it unchecked
        choice = CompletionChoice.model_construct(index=0, text=text, finish_reason=None, logprobs=None)
    else:
        choice = CompletionChoice(index=0, text=text, finish_reason=finish_reason, logprobs=None)
    kwargs = {"usage": use} if use is not None else {}
    return Completion(
        id=rid,
        created=created,
        model=model,
        object="text_completion",
        choices=[choice] if choices else [],
        **kwargs,
    )


def sse(event: BaseModel | dict) -> str:
    """One server-sent event carrying `event` as JSON."""
    if isinstance(event, BaseModel):
        return f"data: {event.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(event)}\n\n"
