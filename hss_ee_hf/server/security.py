"""What a share server demands of its clients: TLS, mutual TLS and bearer tokens (DESIGN.md §7).

[`HSSEEServerSecurity`] holds the server's certificate, an optional client CA that turns on mutual TLS, and the
accepted tokens (read from a file when the config is built); [`TokenAuthInterceptor`] enforces the tokens on every
gRPC call. Neither shows a key or a token in its `repr` or in a message.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..transport.config import (
    _BEARER,
    AUTH_METADATA_KEY,
    HEALTH_METHOD_PREFIX,
    HSSEEClientConfig,
    SecurityConfigError,
    _read_file,
    _warn_if_readable_by_others,
    read_tokens,
)

logger = logging.getLogger(__name__)


def token_accepted(token: bytes, accepted: Sequence[bytes]) -> bool:
    """Whether `token` is one of `accepted`, compared in constant time (gRPC metadata and data-plane HELLO alike)."""
    # No early exit: every accepted token is compared, so timing does not tell which one was close.
    matches = [hmac.compare_digest(token, candidate) for candidate in accepted]
    return any(matches)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls whose `authorization: Bearer TOKEN` metadata does not hold an accepted token.

    Tokens are compared in constant time. Health checks pass without a token (see `HEALTH_METHOD_PREFIX`).

    Args:
        tokens (`Sequence[str]`): the accepted tokens.
    """

    def __init__(self, tokens: Sequence[str]):
        if not tokens:
            raise SecurityConfigError("a token interceptor needs at least one token")
        self._tokens = tuple(t.encode("utf-8") for t in tokens)

    def __repr__(self) -> str:
        return f"TokenAuthInterceptor({len(self._tokens)} tokens)"

    def _accepted(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = [v for k, v in (metadata or ()) if k == AUTH_METADATA_KEY]
        if len(presented) != 1:
            return False
        value = presented[0].encode("utf-8") if isinstance(presented[0], str) else presented[0]
        if not value.startswith(_BEARER.encode()):
            return False
        return token_accepted(value[len(_BEARER) :], self._tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(HEALTH_METHOD_PREFIX) or self._accepted(
            handler_call_details.invocation_metadata
        ):
            return continuation(handler_call_details)
        return _REFUSED_STREAM if handler_call_details.method.endswith("Stream") else _REFUSED


def _refuse(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong bearer token (`authorization: Bearer TOKEN` metadata)",
    )


def _refuse_stream(requests: Any, context: grpc.ServicerContext) -> None:
    _refuse(None, context)


# The request is never parsed for a refused call: identity deserializer.
_REFUSED = grpc.unary_unary_rpc_method_handler(_refuse)
_REFUSED_STREAM = grpc.stream_stream_rpc_method_handler(_refuse_stream)


@dataclass(repr=False)
class HSSEEServerSecurity:
    """What a share server demands of its clients: TLS, mutual TLS, bearer tokens.

    Args:
        tls_cert (`str` or `os.PathLike`, *optional*): PEM certificate chain of the server. Its SAN must name
            the host clients connect to. Needs `tls_key`.
        tls_key (`str` or `os.PathLike`, *optional*): PEM private key of `tls_cert`.
        tls_client_ca (`str` or `os.PathLike`, *optional*): PEM CA that signs client certificates; when set,
            clients must present a certificate it signed (mutual TLS). Needs `tls_cert`.
        token_file (`str` or `os.PathLike`, *optional*): file of accepted bearer tokens, one per line.
        tokens (`Sequence[str]`, *optional*): accepted tokens given directly (tests, embedding).

    Example:

    ```python
    >>> security = HSSEEServerSecurity(tls_cert="server.pem", tls_key="server.key", token_file="tokens.txt")
    >>> server, port = start_server(engine, "0.0.0.0", 50051, security=security)
    ```
    """

    tls_cert: str | os.PathLike | None = None
    tls_key: str | os.PathLike | None = None
    tls_client_ca: str | os.PathLike | None = None
    token_file: str | os.PathLike | None = None
    tokens: Sequence[str] = ()
    _accepted: tuple[str, ...] = field(default=(), init=False, compare=False)
    _accepted_bytes: tuple[bytes, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError(
                "TLS needs both the server certificate and its key; pass `--tls-cert` and `--tls-key` together"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SecurityConfigError(
                "mutual TLS (`--tls-client-ca`) needs the server's own certificate and key (`--tls-cert`, `--tls-key`)"
            )
        accepted = tuple(HSSEEClientConfig._check_token(t) for t in self.tokens)
        if self.token_file is not None:
            accepted += read_tokens(self.token_file)
        self._accepted = accepted
        self._accepted_bytes = tuple(t.encode("utf-8") for t in accepted)
        if self.tls_key is not None:
            _warn_if_readable_by_others(self.tls_key, "TLS key")

    def __repr__(self) -> str:  # never show a token
        return (
            f"HSSEEServerSecurity(tls={self.uses_tls}, mutual_tls={self.tls_client_ca is not None}, "
            f"tokens={len(self._accepted)})"
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def requires_token(self) -> bool:
        return bool(self._accepted)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """The server's TLS credentials (client certificates required with a client CA), or `None`.

        Raises:
            `SecurityConfigError`: a PEM file cannot be read.
        """
        if not self.uses_tls:
            return None
        pair = (
            _read_file(self.tls_key, "TLS key", "--tls-key"),
            _read_file(self.tls_cert, "certificate", "--tls-cert"),
        )
        client_ca = _read_file(self.tls_client_ca, "client CA", "--tls-client-ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The standard library TLS context of the data plane, from the same files as `server_credentials`
        (client certificates signed by `tls_client_ca` required when it is set), or `None` for plaintext.

        Raises:
            `SecurityConfigError`: a PEM file cannot be read or is not a certificate or key.
        """
        if not self.uses_tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _read_file(self.tls_key, "TLS key", "--tls-key")
        _read_file(self.tls_cert, "certificate", "--tls-cert")
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
            if self.tls_client_ca is not None:
                pem = _read_file(self.tls_client_ca, "client CA", "--tls-client-ca").decode("ascii", errors="replace")
                context.load_verify_locations(cadata=pem)
                context.verify_mode = ssl.CERT_REQUIRED
        except ssl.SSLError as err:
            raise SecurityConfigError(
                f"a TLS file is not a valid PEM certificate or key ({err.reason or err}); check `--tls-cert`, "
                "`--tls-key` and `--tls-client-ca`"
            ) from err
        return context

    def accepts(self, token: bytes) -> bool:
        """Whether a bearer token is accepted: always when none is required, else compared in constant time."""
        return not self._accepted or token_accepted(token, self._accepted_bytes)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """Server interceptors enforcing the tokens (none when no token is required)."""
        return [TokenAuthInterceptor(self._accepted)] if self._accepted else []
