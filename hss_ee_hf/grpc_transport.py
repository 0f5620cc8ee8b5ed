"""The network transport: two `hss-ee serve` processes reached over gRPC (DESIGN.md §7).

[`GrpcTransport`] keeps one channel per server and sends each stage to both at once: party A gets the
32-byte seed of its share, party B its share bytes. Every gRPC failure becomes a [`TransportError`] that
names the server and says what to do.
"""

from __future__ import annotations

import grpc
import torch

from .checkpoint import short
from .engine import PROTOCOL_VERSION
from .errors import TransportError
from .protos import hss_ee_pb2, hss_ee_pb2_grpc
from .sharing import Shares
from .transport import Transport, bytes_to_share

DEFAULT_TIMEOUT = 60.0
# The largest message gRPC can carry; servers enforce their own, tighter limit.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1

_ADVICE = {
    "INVALID_ARGUMENT": "the server refused the request as malformed; run the same hss-ee-hf version on client and "
    "servers",
    "FAILED_PRECONDITION": "point the client at servers started with the same EE checkpoint and hss-ee-hf version",
    "RESOURCE_EXHAUSTED": "send fewer rows per request (the server's limit is `describe()[i]['max_rows']`) or start "
    "the server with a higher `--max-rows`",
    "DEADLINE_EXCEEDED": "the server did not answer in time; it may be overloaded, or raise the transport's `timeout`",
    "UNAUTHENTICATED": "pass the credentials the server requires",
    "PERMISSION_DENIED": "pass the credentials the server requires",
    "UNIMPLEMENTED": "the endpoint is not an hss-ee share server, or runs an incompatible hss-ee-hf version",
    "INTERNAL": "the server failed while computing; its log names the cause",
    "CANCELLED": "the call was cancelled before the server answered; retry",
}


def _rpc_error(endpoint: str, err: grpc.RpcError) -> TransportError:
    """Turns a failed call into a `TransportError` naming `endpoint`, the status and what to do."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else None
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE":
        advice = (
            f"the server at {endpoint} is not reachable; start it with `hss-ee serve CHECKPOINT --port PORT` "
            "and check the host, port and firewall"
        )
    else:
        advice = _ADVICE.get(name, "check the server's log")
    return TransportError(endpoint, f"{name}: {details or 'no details'}; {advice}")


class GrpcTransport(Transport):
    """Runs stages on two share servers over gRPC, both calls in flight at once.

    Args:
        endpoints (`tuple[str, str]`): `host:port` of party A and party B.
        timeout (`float`, *optional*, defaults to 60.0): seconds one call may take before it fails with
            `DEADLINE_EXCEEDED`.
        max_message_bytes (`int`, *optional*): send/receive limit of the channels. Defaults to the largest
            message gRPC can carry (2 GiB - 1); each server enforces its own limit.

    Example:

    ```python
    >>> from hss_ee_hf.grpc_transport import GrpcTransport
    >>> with GrpcTransport(("10.0.0.1:50051", "10.0.0.2:50051")) as transport:
    ...     transport.check_fingerprint(fingerprint)
    ...     y_a, y_b = transport.run_stage(fingerprint, "layers.0.qkv", shares, out_features=576)
    ```
    """

    def __init__(
        self, endpoints: tuple[str, str], timeout: float = DEFAULT_TIMEOUT, max_message_bytes: int | None = None
    ):
        if isinstance(endpoints, str) or len(endpoints) != 2 or not all(isinstance(e, str) and e for e in endpoints):
            raise ValueError(f"endpoints must be two 'host:port' strings (party A, party B), got {endpoints!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        limit = GRPC_MAX_MESSAGE_BYTES if max_message_bytes is None else max_message_bytes
        if not 0 < limit <= GRPC_MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in (0, {GRPC_MAX_MESSAGE_BYTES}], got {limit}")
        self.endpoints = (endpoints[0], endpoints[1])
        self.timeout = timeout
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        self._channels = tuple(grpc.insecure_channel(endpoint, options=options) for endpoint in self.endpoints)
        self._stubs = tuple(hss_ee_pb2_grpc.ShareServerStub(channel) for channel in self._channels)

    def _gather(self, futures: list[grpc.Future]) -> list:
        """Waits for one call per party; on a failure cancels the other call and raises for the first failure."""
        results = []
        for party, future in enumerate(futures):
            try:
                results.append(future.result())
            except grpc.RpcError as err:
                for other in futures:
                    other.cancel()
                raise _rpc_error(self.endpoints[party], err) from err
        return results

    def run_stage(
        self, fingerprint: str, stage: str, shares: Shares, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one stage on both servers; see [`Transport.run_stage`].

        Raises:
            `TransportError`: naming the server that failed or answered with a reply of the wrong size.
        """
        rows = shares.b.shape[0]
        common = {"version": PROTOCOL_VERSION, "fingerprint": fingerprint, "stage": stage, "rows": rows}
        requests = (
            hss_ee_pb2.StageRequest(seed=shares.seed, **common),
            hss_ee_pb2.StageRequest(share=shares.b.numpy().tobytes(), **common),
        )
        futures = [
            stub.Stage.future(request, timeout=self.timeout)
            for stub, request in zip(self._stubs, requests, strict=True)
        ]
        replies = self._gather(futures)
        y_a, y_b = (
            bytes_to_share(reply.share, rows, out_features, endpoint)
            for reply, endpoint in zip(replies, self.endpoints, strict=True)
        )
        return y_a, y_b

    def describe(self) -> tuple[dict, dict]:
        """Asks both servers what they serve.

        Returns:
            One dict per server, in endpoint order, with keys `endpoint`, `fingerprint`, `protocol_version`,
            `max_rows` and `stages` (stage name -> `(in_features, out_features)`, in forward-pass order).

        Raises:
            `TransportError`: naming the server that could not be asked.
        """
        futures = [stub.Describe.future(hss_ee_pb2.DescribeRequest(), timeout=self.timeout) for stub in self._stubs]
        replies = self._gather(futures)
        return tuple(
            {
                "endpoint": endpoint,
                "fingerprint": reply.fingerprint,
                "protocol_version": reply.protocol_version,
                "max_rows": reply.max_rows,
                "stages": {s.name: (s.in_features, s.out_features) for s in reply.stages},
            }
            for reply, endpoint in zip(replies, self.endpoints, strict=True)
        )

    def check_fingerprint(self, fingerprint: str) -> None:
        """Checks that both servers serve the checkpoint `fingerprint` with this client's protocol version.

        Args:
            fingerprint (`str`): the EE checkpoint's fingerprint (`HSSEECheckpointInfo.fingerprint`).

        Raises:
            `TransportError`: naming the first server that is unreachable, serves another checkpoint, or speaks
                another protocol version.
        """
        for info in self.describe():
            if info["fingerprint"] != fingerprint:
                raise TransportError(
                    info["endpoint"],
                    f"serves checkpoint {short(info['fingerprint'])} but the client expects {short(fingerprint)}; "
                    "start both servers with the EE checkpoint the client loads",
                )
            if info["protocol_version"] != PROTOCOL_VERSION:
                raise TransportError(
                    info["endpoint"],
                    f"speaks protocol version {info['protocol_version']}, this client {PROTOCOL_VERSION}; "
                    "run the same hss-ee-hf version on client and servers",
                )

    def close(self) -> None:
        """Closes both channels (calls in flight are cancelled)."""
        for channel in self._channels:
            channel.close()
