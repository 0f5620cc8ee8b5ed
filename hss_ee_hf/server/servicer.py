"""The `ShareServer` gRPC service: request parsing, the servicer, and its method handlers.

[`ShareServicer`] answers `Stage` (one unary call), `StageStream` (the same calls on one long-lived stream)
and `Describe` over one [`StageEngine`]. A body that is not a valid protobuf is refused here, everything else
by the engine; a refused request gets the matching gRPC status and the server keeps serving. Payloads (shares
and seeds) are never logged and never echoed in a status message. [`hss_ee_hf.server`] binds it to a port.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import DecodeError, Message

from ..errors import StageRequestError
from ..transport.base import PROTOCOL_VERSION
from ..transport.protos import hss_ee_pb2, hss_ee_pb2_grpc
from ..transport.streams import STREAM_LIMIT_DETAILS
from .engine import StageEngine

logger = logging.getLogger(__name__)

SERVICE_NAME = hss_ee_pb2.DESCRIPTOR.services_by_name["ShareServer"].full_name
# An open stream holds a worker thread; by default three quarters of 32 workers may.
DEFAULT_MAX_STREAMS = 24
# Status details travel in HTTP/2 trailers; keep them short whatever a client sent.
_MAX_DETAILS_CHARS = 1024
_INTERNAL_DETAILS = "internal server error; the request was not computed. The server log names the cause"


class _Undecodable:
    """Stands in for a request body that is not a valid protobuf of the method's message type."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | _Undecodable]:
    """A request deserializer that never raises, so a garbage body gets `INVALID_ARGUMENT`, not `INTERNAL`."""
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | _Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return _Undecodable(
                f"the request body ({len(data)} bytes) is not a valid {name} protobuf; "
                "use an hss-ee-hf client of the server's version"
            )

    return parse


def _status_code(code: str) -> grpc.StatusCode:
    """Maps a `StageRequestError.code` to its gRPC status (unknown names count as `INVALID_ARGUMENT`)."""
    return grpc.StatusCode.__members__.get(code, grpc.StatusCode.INVALID_ARGUMENT)


class ShareServicer(hss_ee_pb2_grpc.ShareServerServicer):
    """The `ShareServer` gRPC service over one [`StageEngine`]; stateless between requests.

    Args:
        engine (`StageEngine`): the loaded EE checkpoint this server computes with.
        max_streams (`int`, *optional*): how many stage streams may be open at once.
        operator (`str`, *optional*): who runs this server, reported by `Describe` (`--operator`).
        data_port (`int`, *optional*, defaults to 0): the data-plane port `Describe` advertises (0: none).

    Example:

    ```python
    >>> # `start_server` registers it with a parser that turns an undecodable body into INVALID_ARGUMENT
    >>> server, port = start_server(StageEngine("smollm2-ee", max_rows=4096), port=0)
    ```
    """

    def __init__(
        self, engine: StageEngine, max_streams: int = DEFAULT_MAX_STREAMS, operator: str = "", data_port: int = 0
    ):
        self.engine = engine
        self.data_port = data_port
        # A fresh id per server start: a client that sees one id at both parties is talking to one process.
        self.instance_id = os.urandom(16).hex()
        self.operator = operator
        # An open stream holds a worker thread for its lifetime; the rest stay free for unary calls.
        self.max_streams = max_streams
        self._stream_slots = threading.BoundedSemaphore(max_streams) if max_streams > 0 else None

    def Stage(self, request: hss_ee_pb2.StageRequest, context: grpc.ServicerContext) -> hss_ee_pb2.StageReply:
        """Validates one request and returns this server's output share (or aborts with the matching status)."""
        if isinstance(request, _Undecodable):
            logger.info("refused a stage request (INVALID_ARGUMENT): undecodable body")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        which = request.WhichOneof("input")
        try:
            out = self.engine.compute(
                request.fingerprint,
                request.stage,
                request.rows,
                share=request.share if which == "share" else None,
                seed=request.seed if which == "seed" else None,
                version=request.version,
            )
        except StageRequestError as err:
            # The engine's messages name sizes, stages and fingerprints, never payload bytes.
            details = str(err)[:_MAX_DETAILS_CHARS]
            logger.info("refused a stage request (%s): %s", err.code, details)
            context.abort(_status_code(err.code), details)
        except Exception as err:  # any failure must become a status, never a dropped call
            # Log where it failed but not the exception's message or source lines: they may hold request data.
            where = " <- ".join(
                f"{frame.filename}:{frame.lineno} in {frame.name}"
                for frame in reversed(traceback.extract_tb(err.__traceback__))
            )
            logger.error("stage request failed with %s at %s", type(err).__name__, where)
            context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_DETAILS)
        return hss_ee_pb2.StageReply(share=bytes(out))

    def StageStream(
        self, requests: Iterator[hss_ee_pb2.StageRequest], context: grpc.ServicerContext
    ) -> Iterator[hss_ee_pb2.StageReply]:
        """Answers stage requests on one stream, in order; a refused request ends the stream with its status."""
        if self._stream_slots is None or not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{STREAM_LIMIT_DETAILS}: all {self.max_streams} are open; the client falls back to unary calls "
                "(start the server with more `--workers` to serve more streaming sessions)",
            )
        try:
            for request in requests:
                yield self.Stage(request, context)
        finally:
            self._stream_slots.release()

    def Describe(self, request: hss_ee_pb2.DescribeRequest, context: grpc.ServicerContext) -> hss_ee_pb2.DescribeReply:
        """Reports the checkpoint's fingerprint, the protocol version, every stage, `max_rows` and the data port."""
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        stages = []
        for name, (in_f, out_f) in self.engine.describe().items():
            scales = self.engine.stage_scales(name)  # fused stages only: built here, the client cannot know them
            raw = b"" if scales is None else scales.double().numpy().astype("<f8").tobytes()
            stages.append(hss_ee_pb2.StageInfo(name=name, in_features=in_f, out_features=out_f, scales=raw))
        return hss_ee_pb2.DescribeReply(
            fingerprint=self.engine.fingerprint,
            protocol_version=PROTOCOL_VERSION,
            stages=stages,
            max_rows=self.engine.max_rows,
            schedules=self.engine.schedules,
            instance_id=self.instance_id,
            operator=self.operator,
            data_port=self.data_port,
        )


def share_server_handler(servicer: ShareServicer) -> grpc.GenericRpcHandler:
    """The `ShareServer` service with lenient request parsing (the generated registration raises on garbage)."""
    methods = {
        "Stage": (servicer.Stage, hss_ee_pb2.StageRequest, hss_ee_pb2.StageReply),
        "Describe": (servicer.Describe, hss_ee_pb2.DescribeRequest, hss_ee_pb2.DescribeReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=_lenient_parser(request_type),
            response_serializer=reply_type.SerializeToString,
        )
        for name, (behaviour, request_type, reply_type) in methods.items()
    }
    handlers["StageStream"] = grpc.stream_stream_rpc_method_handler(
        servicer.StageStream,
        request_deserializer=_lenient_parser(hss_ee_pb2.StageRequest),
        response_serializer=hss_ee_pb2.StageReply.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
