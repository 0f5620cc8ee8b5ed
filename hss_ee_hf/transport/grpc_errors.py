"""What a failed gRPC call means to the user: the status code, and advice that says what to do about it."""

from __future__ import annotations

import grpc

from ..errors import TransportError
from .config import HSSEEClientConfig


def error_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call (unary or streamed), `None` when gRPC gave none."""
    code = getattr(err, "code", None)
    return code() if callable(code) else None


ADVICE = {
    "INVALID_ARGUMENT": "the server refused the request as malformed; run the same hss-ee-hf version on client and "
    "servers",
    "FAILED_PRECONDITION": "point the client at servers started with the same EE checkpoint and hss-ee-hf version",
    "RESOURCE_EXHAUSTED": "send fewer rows per request (the server's limit is `describe()[i]['max_rows']`) or start "
    "the server with a higher `--max-rows`",
    "DEADLINE_EXCEEDED": "the server did not answer in time; it may be overloaded, or raise the transport's `timeout`",
    "UNAUTHENTICATED": "pass the bearer token the server was started with (`HSSEEClientConfig(token_file=...)`, "
    "`--token-file` or the HSS_EE_TOKEN environment variable)",
    "PERMISSION_DENIED": "pass the credentials the server requires",
    "UNIMPLEMENTED": "the endpoint is not an hss-ee share server, or runs an incompatible hss-ee-hf version",
    "INTERNAL": "the server failed while computing; its log names the cause",
    "CANCELLED": "the call was cancelled before the server answered; retry",
}


def unavailable_advice(endpoint: str, config: HSSEEClientConfig, details: str) -> str:
    """What to do about an `UNAVAILABLE` reply, told apart by what gRPC reports about the connection."""
    if "WRONG_VERSION_NUMBER" in details:
        return (
            f"the server at {endpoint} does not speak TLS; start it with `--tls-cert` and `--tls-key`, or connect "
            "without TLS (only on a trusted network)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details or "Peer name" in details or "peer name" in details:
        return (
            f"the certificate of {endpoint} is not signed by the CA this client trusts (`--tls-ca`) or does not "
            "name this host; pass the CA that signed it, or `--tls-server-name` with the name in its SAN"
        )
    # The last of several attempts may report the refused handshake itself rather than the closed socket.
    handshake = config.uses_tls and ("handshake" in details.lower() or "TSI_" in details)
    if "Socket closed" in details or "Connection reset" in details or handshake:
        if config.uses_tls:
            return (
                f"{endpoint} closed the connection during the TLS handshake: it probably requires a client "
                "certificate (mutual TLS); pass `--tls-cert` and `--tls-key` signed by the CA it trusts "
                "(`HSSEEClientConfig(tls_client_cert=..., tls_client_key=...)`)"
            )
        return (
            f"{endpoint} closed the plaintext connection at once: it probably requires TLS; pass the CA that "
            "signed its certificate (`HSSEEClientConfig(tls_ca_cert=...)`, `--tls-ca`) and connect without TLS "
            "only to a server started without `--tls-cert`"
        )
    return (
        f"the server at {endpoint} is not reachable; start it with `hss-ee serve CHECKPOINT --port PORT` "
        "and check the host, port and firewall"
        + (" (and that it uses TLS, as this client does)" if config.uses_tls else "")
    )


def rpc_error(
    endpoint: str, err: grpc.RpcError, config: HSSEEClientConfig, attempts: int = 1, earlier: str = ""
) -> TransportError:
    """Turns a failed call into a `TransportError` naming `endpoint`, the status and what to do.

    `earlier` holds the details of the attempts before this one: after retries the last one may only say "failed to
    connect", while the first told why (a refused TLS handshake, a plaintext server), which is what the advice needs.
    """
    code = error_code(err)
    details = err.details() if callable(getattr(err, "details", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE":
        advice = unavailable_advice(endpoint, config, f"{details or ''} {earlier}")
    else:
        advice = ADVICE.get(name, "check the server's log")
    tried = f" (after {attempts} attempts)" if attempts > 1 else ""
    return TransportError(endpoint, f"{name}{tried}: {details or 'no details'}; {advice}")
