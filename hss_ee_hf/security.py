"""Transport security for share servers and clients: TLS, mutual TLS and bearer tokens (DESIGN.md §7).

[`HSSEEClientConfig`] says how a client reaches its two servers (CA to trust, optional client certificate,
bearer token, deadline, retries); [`HSSEEServerSecurity`] says what a server demands (its certificate, an
optional client CA that turns on mutual TLS, accepted tokens). Token files are read when a config is built,
PEM files when a channel or a server is made; neither class shows a key or a token in its `repr` or in a
message. The argparse helpers give `hss-ee serve` and `hss-ee generate` the same flag names.

TLS protects the shares and the token on the wire; it does not change what a server itself learns
(see SECURITY.md).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .errors import HSSEEError

logger = logging.getLogger(__name__)

TOKEN_ENV = "HSS_EE_TOKEN"
AUTH_METADATA_KEY = "authorization"
_BEARER = "Bearer "
# Probes (load balancers, Kubernetes) ask for health without credentials; health reveals nothing private.
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4
DEFAULT_INITIAL_BACKOFF = 0.1
DEFAULT_MAX_BACKOFF = 5.0
DEFAULT_BACKOFF_MULTIPLIER = 2.0


class SecurityConfigError(HSSEEError, ValueError):
    """A TLS or token setting is incomplete, or a certificate, key or token file cannot be read."""


def _read_file(path: str | os.PathLike, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(
            f"cannot read the {what} {path} ({err.strerror}); check the path given to {flag}"
        ) from err
    if not data.strip():
        raise SecurityConfigError(f"the {what} {path} is empty; pass the right file to {flag}")
    return data


def _warn_if_readable_by_others(path: str | os.PathLike, what: str) -> None:
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the %s %s is readable by other users; restrict it with `chmod 600`", what, path)


def read_tokens(path: str | os.PathLike, flag: str = "--token-file") -> tuple[str, ...]:
    """Reads bearer tokens from a file: one per line, blank lines and `#` comments ignored.

    Several lines let a server accept an old and a new token while clients move over (rotation).

    Args:
        path (`str` or `os.PathLike`): the token file (keep it mode 0600).
        flag (`str`, *optional*): the option that named the file, for error messages.

    Returns:
        The tokens, in file order.

    Raises:
        `SecurityConfigError`: the file cannot be read, holds no token, or a token has whitespace inside.
    """
    _warn_if_readable_by_others(path, "token file")
    text = _read_file(path, "token file", flag).decode("utf-8", errors="strict")
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise SecurityConfigError(f"the token file {path} holds no token; write one token per line")
    if any(any(c.isspace() for c in t) or not t.isprintable() for t in tokens):
        raise SecurityConfigError(f"a token in {path} has spaces or control characters; use one token per line")
    return tokens


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]") if ":" in endpoint else endpoint
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(repr=False)
class HSSEEClientConfig:
    """How a client reaches its two share servers: TLS, credentials, deadlines and retries.

    Args:
        tls (`bool`, *optional*, defaults to `False`): use TLS. Implied by `tls_ca_cert` or a client
            certificate; with `tls=True` alone the system's trusted roots verify the servers.
        tls_ca_cert (`str` or `os.PathLike`, *optional*): PEM file of the CA that signed the servers'
            certificates (a private CA for self-run servers).
        tls_client_cert (`str` or `os.PathLike`, *optional*): PEM certificate chain this client presents
            (mutual TLS). Needs `tls_client_key`.
        tls_client_key (`str` or `os.PathLike`, *optional*): PEM private key of `tls_client_cert`.
        tls_server_name (`str`, *optional*): the name to expect in the servers' certificates when it differs
            from the host in the endpoint (e.g. connecting by IP to a certificate issued for a DNS name).
        token (`str`, *optional*): bearer token sent with every call (`authorization: Bearer ...`).
            Prefer `token_file` or the `HSS_EE_TOKEN` environment variable to typing it in a command line.
        token_file (`str` or `os.PathLike`, *optional*): file whose first token line is the bearer token.
        timeout (`float`, *optional*, defaults to 60.0): deadline in seconds of each call (each attempt).
        retries (`int`, *optional*, defaults to 4): extra attempts after an `UNAVAILABLE` reply. Stage calls
            are stateless and idempotent, so repeating one is safe.
        initial_backoff (`float`, *optional*, defaults to 0.1): seconds before the first retry.
        max_backoff (`float`, *optional*, defaults to 5.0): cap of the wait between retries.
        backoff_multiplier (`float`, *optional*, defaults to 2.0): growth of the wait per retry.
        max_message_bytes (`int`, *optional*): channel send/receive limit (defaults to gRPC's largest).
        stream (`bool`, *optional*, defaults to `True`): send stage calls on long-lived bidirectional streams
            (one message each way per call) instead of one unary call each; a server without streams to spare
            is reached with unary calls either way.
        data_plane (`bool`, *optional*, defaults to `True`): send stage calls as binary frames on the data-plane
            port a server advertises in `Describe` (same TLS, certificates and token as gRPC; see
            `hss_ee_hf.frames`), keeping gRPC for everything else. Servers that advertise none, or whose data
            port cannot be reached, get gRPC (streams, as `stream` says) either way.

    Example:

    ```python
    >>> from hss_ee_hf.security import HSSEEClientConfig
    >>> from hss_ee_hf.grpc_transport import GrpcTransport
    >>> config = HSSEEClientConfig(tls_ca_cert="ca.pem", token_file="token.txt", timeout=30.0)
    >>> transport = GrpcTransport(("a.example.org:50051", "b.example.org:50051"), config=config)
    ```
    """

    tls: bool = False
    tls_ca_cert: str | os.PathLike | None = None
    tls_client_cert: str | os.PathLike | None = None
    tls_client_key: str | os.PathLike | None = None
    tls_server_name: str | None = None
    token: str | None = None
    token_file: str | os.PathLike | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    backoff_multiplier: float = DEFAULT_BACKOFF_MULTIPLIER
    max_message_bytes: int | None = None
    stream: bool = True
    data_plane: bool = True
    _token_value: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise SecurityConfigError(f"timeout must be positive seconds, got {self.timeout}")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise SecurityConfigError(f"retries must be a non-negative integer, got {self.retries!r}")
        if not (self.initial_backoff >= 0 and self.max_backoff >= 0 and self.backoff_multiplier >= 1):
            raise SecurityConfigError(
                "backoff must be initial_backoff >= 0, max_backoff >= 0 and backoff_multiplier >= 1, got "
                f"{self.initial_backoff}, {self.max_backoff}, {self.backoff_multiplier}"
            )
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise SecurityConfigError(
                "mutual TLS needs both a client certificate and its key; pass tls_client_cert and tls_client_key "
                "(`--tls-cert` and `--tls-key`) together"
            )
        if self.token is not None and self.token_file is not None:
            raise SecurityConfigError("pass either token or token_file, not both")
        if self.token is not None:
            self._token_value = self._check_token(self.token)
        elif self.token_file is not None:
            self._token_value = read_tokens(self.token_file)[0]

    @staticmethod
    def _check_token(token: str) -> str:
        token = token.strip()
        if not token or any(c.isspace() for c in token) or not token.isprintable():
            raise SecurityConfigError("the bearer token is empty or has spaces or control characters")
        return token

    def __repr__(self) -> str:  # never show the token
        return (
            f"HSSEEClientConfig(tls={self.uses_tls}, tls_ca_cert={self.tls_ca_cert!r}, "
            f"mutual_tls={self.tls_client_cert is not None}, token={'<secret>' if self._token_value else None}, "
            f"timeout={self.timeout}, retries={self.retries})"
        )

    @property
    def uses_tls(self) -> bool:
        """Whether channels use TLS."""
        return bool(self.tls or self.tls_ca_cert is not None or self.tls_client_cert is not None)

    @property
    def has_token(self) -> bool:
        """Whether calls carry a bearer token."""
        return self._token_value is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """The TLS credentials of a channel, or `None` for plaintext.

        Raises:
            `SecurityConfigError`: a PEM file cannot be read.
        """
        if not self.uses_tls:
            return None
        root = _read_file(self.tls_ca_cert, "CA certificate", "--tls-ca") if self.tls_ca_cert else None
        key = chain = None
        if self.tls_client_cert is not None:
            chain = _read_file(self.tls_client_cert, "client certificate", "--tls-cert")
            key = _read_file(self.tls_client_key, "client key", "--tls-key")
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel options implied by this config (target-name override)."""
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls_server_name else []

    def ssl_context(self) -> ssl.SSLContext | None:
        """The standard library TLS context of the data plane, from the same files as `channel_credentials`.

        Only the CA in `tls_ca_cert` is trusted when it is set (as gRPC does), else the system's roots; the server
        certificate must name the host (or `tls_server_name`); `tls_client_cert` is presented for mutual TLS.

        Raises:
            `SecurityConfigError`: a PEM file cannot be read or is not a certificate or key.
        """
        if not self.uses_tls:
            return None
        try:
            if self.tls_ca_cert is not None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                pem = _read_file(self.tls_ca_cert, "CA certificate", "--tls-ca").decode("ascii", errors="replace")
                context.load_verify_locations(cadata=pem)
            else:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.tls_client_cert is not None:
                _read_file(self.tls_client_cert, "client certificate", "--tls-cert")
                _read_file(self.tls_client_key, "client key", "--tls-key")
                context.load_cert_chain(self.tls_client_cert, self.tls_client_key)
        except ssl.SSLError as err:
            raise SecurityConfigError(
                f"a TLS file is not a valid PEM certificate or key ({err.reason or err}); check `--tls-ca`, "
                "`--tls-cert` and `--tls-key`"
            ) from err
        return context

    def token_bytes(self) -> bytes:
        """The bearer token as sent on the data plane (empty when none is set)."""
        return self._token_value.encode("utf-8") if self._token_value else b""

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call: the bearer token if one is set."""
        return ((AUTH_METADATA_KEY, _BEARER + self._token_value),) if self._token_value else ()

    def check_endpoints(self, endpoints: Sequence[str]) -> None:
        """Warns when a token would travel in plaintext to a host that is not this machine."""
        if self.has_token and not self.uses_tls:
            exposed = [e for e in endpoints if not _is_loopback(e)]
            if exposed:
                logger.warning(
                    "the bearer token is sent without TLS to %s; anyone on the path can read it. Use TLS "
                    "(`--tls-ca`) for servers on other machines",
                    ", ".join(exposed),
                )


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


def add_server_security_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--tls-cert`, `--tls-key`, `--tls-client-ca` and `--token-file` to a server's parser.

    Example:

    ```python
    >>> add_server_security_args(parser)
    >>> security = server_security_from_args(parser.parse_args())
    ```
    """
    group = parser.add_argument_group("transport security")
    group.add_argument("--tls-cert", help="PEM certificate chain of this server (enables TLS; needs --tls-key)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert (keep it mode 0600)")
    group.add_argument(
        "--tls-client-ca", help="PEM CA of client certificates: clients must present one it signed (mutual TLS)"
    )
    group.add_argument(
        "--token-file", help="file of accepted bearer tokens, one per line; calls without one are refused"
    )


def server_security_from_args(args: argparse.Namespace) -> HSSEEServerSecurity | None:
    """Builds the server's security settings from `add_server_security_args` flags (`None` when all unset)."""
    values = {
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "tls_client_ca": getattr(args, "tls_client_ca", None),
        "token_file": getattr(args, "token_file", None),
    }
    if all(v is None for v in values.values()):
        return None
    return HSSEEServerSecurity(**values)


def add_client_security_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name`, `--token-file` and `--retries`.

    A `--timeout` flag, when the parser has one, is read by [`client_config_from_args`] too. The token may also
    come from the `HSS_EE_TOKEN` environment variable.
    """
    group = parser.add_argument_group("transport security")
    group.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    group.add_argument("--tls-ca", help="PEM CA that signed the servers' certificates (enables TLS)")
    group.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (needs --tls-key)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    group.add_argument("--tls-server-name", help="name expected in the servers' certificates, if not the host")
    group.add_argument(
        "--token-file", help=f"file holding the bearer token (or set {TOKEN_ENV}); never pass a token inline"
    )
    group.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=f"retries of an unavailable server (default {DEFAULT_RETRIES})",
    )


def client_config_from_args(args: argparse.Namespace) -> HSSEEClientConfig:
    """Builds an [`HSSEEClientConfig`] from `add_client_security_args` flags (and `--timeout` if present)."""
    token_file = getattr(args, "token_file", None)
    token = os.environ.get(TOKEN_ENV) if token_file is None else None
    return HSSEEClientConfig(
        tls=bool(getattr(args, "tls", False)),
        tls_ca_cert=getattr(args, "tls_ca", None),
        tls_client_cert=getattr(args, "tls_cert", None),
        tls_client_key=getattr(args, "tls_key", None),
        tls_server_name=getattr(args, "tls_server_name", None),
        token=token or None,
        token_file=token_file,
        timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
        retries=getattr(args, "retries", DEFAULT_RETRIES),
    )
