"""Transport security for share servers and clients: TLS, mutual TLS and bearer tokens (DESIGN.md §7).

[`HSSEEClientConfig`] says how a client reaches its two servers (CA to trust, optional client certificate,
bearer token, deadline, retries). What a server demands is `hss_ee_hf.server.security.HSSEEServerSecurity`; the
token and file helpers here are shared by both sides. Token files are read when a config is built, PEM files when
a channel is made; no key or token is ever shown in a `repr` or a message.

TLS protects the shares and the token on the wire; it does not change what a server itself learns
(see SECURITY.md).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ..errors import HSSEEError

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
# A restarted server (an upgrade, a crash) needs seconds to load its weights; calls wait this long for it.
DEFAULT_RESTART_WINDOW = 30.0


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
            from the host in the endpoint (e.g. connecting by IP to a certificate issued for a DNS name, or to a
            pool of replicas). `"NAME_A,NAME_B"` gives one name per party.
        token (`str`, *optional*): bearer token sent with every call (`authorization: Bearer ...`).
            Prefer `token_file` or the `HSS_EE_TOKEN` environment variable to typing it in a command line.
        token_file (`str` or `os.PathLike`, *optional*): file whose first token line is the bearer token.
        timeout (`float`, *optional*, defaults to 60.0): deadline in seconds of each call (each attempt).
        retries (`int`, *optional*, defaults to 4): extra attempts after an `UNAVAILABLE` reply, at least. Stage
            calls are stateless and idempotent, so repeating one is safe. `0` turns retrying off.
        restart_window (`float`, *optional*, defaults to 30.0): beyond `retries`, seconds an `UNAVAILABLE` server
            is still retried (bounded by `timeout`), so a server restarting in that time does not fail the
            generations in flight; a server that is back is used at once.
        initial_backoff (`float`, *optional*, defaults to 0.1): seconds before the first retry.
        max_backoff (`float`, *optional*, defaults to 5.0): cap of the wait between retries.
        backoff_multiplier (`float`, *optional*, defaults to 2.0): growth of the wait per retry.
        max_message_bytes (`int`, *optional*): channel send/receive limit (defaults to gRPC's largest).
        stream (`bool`, *optional*, defaults to `True`): send stage calls on long-lived bidirectional streams
            (one message each way per call) instead of one unary call each; a server without streams to spare
            is reached with unary calls either way.
        data_plane (`bool`, *optional*, defaults to `True`): send stage calls as binary frames on the data-plane
            port a server advertises in `Describe` (same TLS, certificates and token as gRPC; see
            `hss_ee_hf.transport.frames`), keeping gRPC for everything else. Servers that advertise none, or whose data
            port cannot be reached, get gRPC (streams, as `stream` says) either way.
        colocate (`bool`, *optional*, defaults to `True`): when both servers are on this machine (loopback), run
            the generating thread and party B's data-plane thread on one core and party A's on the others (see
            `hss_ee_hf.transport.colocation`; about 25 % faster decoding on 2 cores). No effect otherwise.

    Example:

    ```python
    >>> from hss_ee_hf import HSSEEClientConfig
    >>> from hss_ee_hf.transport.grpc_client import GrpcTransport
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
    restart_window: float = DEFAULT_RESTART_WINDOW
    max_message_bytes: int | None = None
    stream: bool = True
    data_plane: bool = True
    colocate: bool = True
    _token_value: str | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise SecurityConfigError(f"timeout must be positive seconds, got {self.timeout}")
        if not (isinstance(self.restart_window, (int, float)) and 0 <= self.restart_window < float("inf")):
            raise SecurityConfigError(
                f"restart_window must be finite seconds >= 0, got {self.restart_window!r}; 0 keeps only `retries`"
            )
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
