"""The gateway's HTTP API: FastAPI routes for `/v1/models`, `/v1/chat/completions` and `/v1/completions`.

Routes parse and check the request, queue it on the [`GatewayModel`], and answer with OpenAI's types, as JSON or as
server-sent events ending with `data: [DONE]`. Every error is an OpenAI-style body: 400/422 for a bad request, 401
for a missing or wrong API key, 404 for an unknown model or route, 429 when the queue is full, 503 naming the share
server that could not be reached (502 for one that failed its integrity check). None of them stops the gateway.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hss_ee_hf import CheatingServerError, HSSEEError, TransportError

from . import wire
from .manager import GatewayModel, Prompt, TextStream
from .schema import ChatCompletionRequest, CompletionRequest, parse_request
from .wire import GatewayError

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OPEN_PATHS = frozenset({"/health"})


def _error_response(err: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _as_gateway_error(err: Exception) -> GatewayError:
    """What a generation error looks like to an OpenAI client."""
    if isinstance(err, GatewayError):
        return err
    if isinstance(err, CheatingServerError):
        return GatewayError(502, str(err), type="server_error", code="share_server_failed_check")
    if isinstance(err, TransportError):
        return GatewayError(503, str(err), type="server_error", code="share_server_unavailable")
    if isinstance(err, HSSEEError):
        return GatewayError(500, f"{type(err).__name__}: {err}", type="server_error", code="generation_failed")
    return GatewayError(500, "internal error in the hss-ee gateway (see its log)", type="server_error")


class _BearerAuth:
    """ASGI middleware: every path but `/health` needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, key: bytes):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                err = GatewayError(
                    401,
                    "missing or incorrect API key: send `Authorization: Bearer <key>` with the gateway's key",
                    code="invalid_api_key",
                )
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_unset=True), media_type="application/json")


def create_app(model: GatewayModel, *, api_key: str | None = None) -> FastAPI:
    """Builds the gateway's ASGI app around a model manager.

    Args:
        model (`GatewayModel`): the model (and its queue) every request goes to.
        api_key (`str`, *optional*): when set, every route but `/health` needs `Authorization: Bearer <api_key>`.

    Returns:
        A FastAPI app to run with uvicorn (`hss-ee gateway` does).

    Example:
        ```python
        app = create_app(GatewayModel(model, tokenizer, model_id="smollm2-ee"), api_key=open("key").read().strip())
        uvicorn.run(app, host="127.0.0.1", port=8000)
        ```
    """
    # No /docs or /openapi.json: the gateway sees plaintext, so it offers nothing it does not need.
    app = FastAPI(title="hss-ee gateway", docs_url=None, redoc_url=None, openapi_url=None)

    if api_key:
        app.add_middleware(_BearerAuth, key=api_key.encode("utf-8"))

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, err: GatewayError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(HSSEEError)
    async def _hss_ee_error(_request: Request, err: HSSEEError) -> JSONResponse:
        mapped = _as_gateway_error(err)
        logger.warning("request failed with %d: %s", mapped.status, err)
        return _error_response(mapped)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return _error_response(GatewayError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error in the hss-ee gateway")
        return _error_response(_as_gateway_error(err))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return wire.model_list(model.model_id, model.created)

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        model.check_model(model_id)
        return _json(wire.model_card(model.model_id, model.created))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = parse_request(ChatCompletionRequest, await request.body())
        model.check_model(body.model)
        prompt, params = Prompt(messages=body.template_messages()), body.params()
        rid, created = wire.new_id("chatcmpl"), wire.now()
        if not body.stream:
            gen = await model.complete(prompt, params)
            use = wire.usage(gen.prompt_tokens, gen.completion_tokens)
            return _json(wire.chat_completion(rid, created, model.model_id, gen.text, gen.finish_reason, use))

        def chunk(**kwargs):
            return wire.sse(wire.chat_chunk(rid, created, model.model_id, **kwargs))

        return await _stream(
            model.stream(prompt, params),
            head=chunk(role=True),
            piece=lambda text: chunk(content=text),
            tail=lambda gen: (
                [chunk(finish_reason=gen.finish_reason)]
                + ([chunk(use=wire.usage(gen.prompt_tokens, gen.completion_tokens))] if body.include_usage else [])
            ),
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse_request(CompletionRequest, await request.body())
        model.check_model(body.model)
        if isinstance(body.prompt, str):
            prompt = Prompt(text=body.prompt)
        elif body.echo:
            raise GatewayError(422, "echo needs a text prompt, not token ids", param="echo")
        else:
            prompt = Prompt(token_ids=body.prompt)
        echo = body.prompt if body.echo else ""
        params = body.params()
        rid, created = wire.new_id("cmpl"), wire.now()
        if not body.stream:
            gen = await model.complete(prompt, params)
            use = wire.usage(gen.prompt_tokens, gen.completion_tokens)
            return _json(wire.completion(rid, created, model.model_id, echo + gen.text, gen.finish_reason, use))

        def chunk(text: str, finish=None, use=None, choices=True):
            return wire.sse(wire.completion(rid, created, model.model_id, text, finish, use, choices=choices))

        return await _stream(
            model.stream(prompt, params),
            head=chunk(echo) if echo else None,
            piece=chunk,
            tail=lambda gen: (
                [chunk("", gen.finish_reason)]
                + (
                    [chunk("", use=wire.usage(gen.prompt_tokens, gen.completion_tokens), choices=False)]
                    if body.include_usage
                    else []
                )
            ),
        )

    return app


async def _stream(stream: TextStream, *, head: str | None, piece, tail) -> Response:
    """Answers with server-sent events, or with an error status if generation fails before its first text.

    Waiting for the first piece of text before answering is what lets a dead share server be a 503 (naming it)
    rather than an error event inside a 200 stream. After that, an error ends the stream with an `error` event.
    """
    pieces = stream.pieces()
    try:
        first = await anext(pieces, None)
        if first is None:
            await stream.result()  # raises what the generation raised
    except BaseException:
        stream.cancel()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            if head is not None:
                yield head
            if first is not None:
                yield piece(first)
                async for text in pieces:
                    yield piece(text)
            try:
                gen = await stream.result()
            except Exception as err:  # the status line is sent: report it the way OpenAI's streams do
                mapped = _as_gateway_error(err)
                logger.warning("streamed request failed: %s", err)
                yield wire.sse(mapped.body())
                return
            for event in tail(gen):
                yield event
            yield wire.DONE
        finally:
            stream.cancel()  # a client that disconnects stops its generation at the next token

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)
