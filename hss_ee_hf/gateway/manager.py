"""The gateway's model: one `HSSEEForCausalLM` and its tokenizer, generating one request at a time, in arrival order.

Requests wait in a FIFO queue in front of a single worker thread, which does all the tokenizer and model work: a
fast tokenizer is not safe to use from several threads at once, and one private generation already keeps both share
servers busy. Streaming uses transformers' `AsyncTextIteratorStreamer`, fed from the worker thread and read by the
event loop; a client that goes away cancels its generation at the next token (or before it starts, if queued).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AsyncTextIteratorStreamer, StoppingCriteria, StoppingCriteriaList

from .schema import SamplingParams
from .wire import FinishReason, GatewayError

DEFAULT_MAX_TOKENS = 1024
DEFAULT_MAX_QUEUE = 64


@dataclass(frozen=True)
class Prompt:
    """What to continue: chat `messages` (rendered with the tokenizer's chat template), a `text`, or `token_ids`."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None


@dataclass(frozen=True)
class Generation:
    """A finished generation: the text (cut before any stop string) and OpenAI's usage and finish reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class StopFilter:
    """Cuts streamed text before the first stop string, holding back any tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        """Returns the part of `text` (after what was held back) that is certainly output."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[: min(hits)]
        keep = max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])), default=0
        )
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a stop string."""
        rest, self.held = self.held, ""
        return rest


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`(text before the first stop string, whether one was found)`: what the streamed pieces add up to."""
    f = StopFilter(stops)
    out = f.feed(text)
    return (out, True) if f.stopped else (out + f.flush(), False)


class _Cancelled(StoppingCriteria):
    """Stops generation once the request's client has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _StopText(StoppingCriteria):
    """Stops once the new text contains a stop string.

    It checks the very text the client receives (the new tokens decoded as the answer is), so generation ends exactly
    where the answer is cut. transformers' `stop_strings` matches token strings instead, and cannot be built for
    every tokenizer (it fails on word-level vocabularies); a decode per step costs far less than a private step.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, stops: tuple[str, ...]):
        self.tokenizer, self.prompt_tokens, self.stops = tokenizer, prompt_tokens, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_tokens :], skip_special_tokens=True)
        hit = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


class TextStream:
    """A generation in progress: `pieces()` yields its text as it is decoded, `result()` the finished generation."""

    def __init__(self, streamer: AsyncTextIteratorStreamer, future: Future, cancel: threading.Event, stops):
        self._streamer, self._future, self._cancel, self._stops = streamer, future, cancel, stops

    async def pieces(self) -> AsyncIterator[str]:
        stop = StopFilter(self._stops)
        async for text in self._streamer:
            piece = stop.feed(text)
            if piece:
                yield piece
            if stop.stopped:
                self._cancel.set()  # the answer is complete; `_StopText` ends generation at this very token too
                return
        rest = stop.flush()
        if rest:
            yield rest

    async def result(self) -> Generation:
        """The finished generation; raises what generation raised (a `TransportError` for a dead share server)."""
        return await asyncio.wrap_future(self._future)

    def cancel(self) -> None:
        self._cancel.set()
        self._future.cancel()  # drops it from the queue if it has not started


class GatewayModel:
    """Owns one client model and its tokenizer and runs their generations one at a time, first come first served.

    Args:
        model (`HSSEEForCausalLM`): the client model, connected to its two share servers (or any causal LM with
            `generate()`, e.g. the plaintext model in tests).
        tokenizer (`PreTrainedTokenizerBase`): the checkpoint's tokenizer; its chat template renders chat requests.
        model_id (`str`): the id clients name in `model`.
        max_tokens (`int`, *optional*, defaults to 1024): new tokens when a request names no limit (capped by the
            context window).
        max_queue (`int`, *optional*, defaults to 64): requests waiting or running at once; more are refused with a
            429 so that a flood cannot grow memory without bound.

    Example:
        ```python
        manager = GatewayModel(model, tokenizer, model_id="smollm2-ee")
        generation = await manager.complete(Prompt(text="Once upon a time"), SamplingParams(max_tokens=16))
        ```
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_tokens, self.max_queue = max_tokens, max_queue
        self.created = int(time.time())
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hss-ee-gateway")
        self._pending, self._pending_lock = 0, threading.Lock()
        eos = model.generation_config.eos_token_id
        self._eos = ({eos} if isinstance(eos, int) else set(eos or ())) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_model(self, requested: str) -> None:
        """Raises a 404 `model_not_found` unless `requested` is this gateway's model id."""
        if requested != self.model_id:
            raise GatewayError(
                404,
                f"The model {requested!r} does not exist; this gateway serves {self.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def complete(self, prompt: Prompt, params: SamplingParams) -> Generation:
        """Generates in the queue and returns the finished generation."""
        cancel = threading.Event()
        future = self._submit(prompt, params, None, cancel)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def stream(self, prompt: Prompt, params: SamplingParams) -> TextStream:
        """Queues a streamed generation (call from the event loop: the streamer belongs to it)."""
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        return TextStream(streamer, self._submit(prompt, params, streamer, cancel), cancel, params.stop)

    def close(self) -> None:
        """Drops queued requests and waits for the running one."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _submit(self, prompt, params, streamer, cancel) -> Future:
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise GatewayError(
                    429,
                    f"{self._pending} requests are already queued (--max-queue {self.max_queue}); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self._pending += 1
        try:
            future = self._worker.submit(self._run, prompt, params, streamer, cancel)
        except RuntimeError:  # the executor is shut down
            self._done(None)
            raise GatewayError(
                503, "the gateway is shutting down", type="server_error", code="shutting_down"
            ) from None
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future | None) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _run(self, prompt: Prompt, params: SamplingParams, streamer, cancel: threading.Event) -> Generation:
        try:
            ids = self._encode(prompt)
            max_new = self._budget(len(ids), params.max_tokens, "messages" if prompt.messages else "prompt")
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=params.do_sample, pad_token_id=self._pad)
            if params.do_sample:  # OpenAI has no top-k: only temperature and top_p shape the distribution
                kwargs.update(temperature=params.temperature, top_p=params.top_p or 1.0, top_k=0)
                if params.seed is not None:
                    torch.manual_seed(params.seed)  # under the queue: no other generation draws in between
            criteria = StoppingCriteriaList([_Cancelled(cancel)])
            if params.stop:
                criteria.append(_StopText(self.tokenizer, len(ids), params.stop))
            input_ids = torch.tensor([ids], dtype=torch.long)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                stopping_criteria=criteria,
                **kwargs,
            )
        except BaseException:
            if streamer is not None:
                streamer.end()  # wakes the reader; the future carries the error
            raise
        new = out[0, len(ids) :].tolist()
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), params.stop)
        if stopped or (new and new[-1] in self._eos) or len(new) < max_new:
            finish: FinishReason = "stop"
        else:
            finish = "length"
        return Generation(text, len(ids), len(new), finish)

    def _encode(self, prompt: Prompt) -> list[int]:
        tok = self.tokenizer
        if prompt.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise GatewayError(
                    400,
                    f"{self.model_id}'s tokenizer has no chat template; use /v1/completions with a plain prompt",
                    param="messages",
                    code="no_chat_template",
                )
            from jinja2 import TemplateError

            try:
                enc = tok.apply_chat_template(prompt.messages, add_generation_prompt=True, return_dict=True)
            except TemplateError as err:  # e.g. a template that requires alternating roles
                raise GatewayError(400, f"the chat template refused the messages: {err}", param="messages") from None
            ids = list(enc["input_ids"])
        elif prompt.token_ids is not None:
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt.token_ids if not 0 <= t < vocab]
            if bad:
                raise GatewayError(422, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt")
            ids = list(prompt.token_ids)
        else:
            ids = list(tok(prompt.text or "")["input_ids"])
        if not ids:
            if tok.bos_token_id is None:
                raise GatewayError(400, "the prompt is empty", param="prompt")
            ids = [tok.bos_token_id]
        return ids

    def _budget(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """New tokens to generate: the request's limit, or the gateway's default, within the context window."""
        context = self.context_length
        if context is None:
            return requested or self.max_tokens
        room = context - prompt_tokens
        if room <= 0 or (requested is not None and requested > room):
            want = f" plus {requested} new tokens" if requested is not None else ""
            raise GatewayError(
                400,
                f"the prompt has {prompt_tokens} tokens{want}; the model's context window is {context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return requested if requested is not None else min(self.max_tokens, room)
