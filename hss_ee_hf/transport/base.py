"""How output shares come back from the two servers: the interface every transport implements.

[`Transport.run_stage`] sends party A its seed and party B its share of one stage input, and returns
both output shares. Implementations: `InProcessTransport` (`inprocess.py`: two [`StageHandler`]s in this
process, same serialisation, no network) for tests and single-machine trials, and `GrpcTransport`
(`grpc_client.py`) for two `hss-ee serve` processes.

[`StageHandler`] is the small typed interface between a transport and a server's compute core: the server's
`StageEngine` implements it, and nothing on the client side imports the server.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import torch

from ..errors import TransportError
from ..ring.sharing import Shares

PROTOCOL_VERSION = 1
"""Version of the stage request format; a server refuses requests of another version."""


@runtime_checkable
class StageHandler(Protocol):
    """What computes one party's stage product from request bytes: a share server's core, seen from a transport.

    `hss_ee_hf.server.StageEngine` implements it. Implementations validate the request (fingerprint, stage, row
    count, payload length, protocol version) before computing and raise `StageRequestError` (with a `code`) when it
    is wrong.
    """

    def compute(
        self,
        fingerprint: str,
        stage: str,
        rows: int,
        share: bytes | None = None,
        seed: bytes | None = None,
        version: int = PROTOCOL_VERSION,
        geometry=None,
    ) -> bytes:
        """Returns the little-endian int64 bytes of this party's `(rows, out_features)` output share.

        With `geometry` (a `ConvGeometry`, `geometry.py`) the input is `rows` images' feature maps, which the handler
        unfolds; the output then has `rows * patches` rows."""
        ...


def bytes_to_share(data: bytes, rows: int, out_features: int, endpoint: str) -> torch.Tensor:
    """Checks a reply's length and views it as an `(rows, out_features)` int64 tensor."""
    expected = rows * out_features * 8
    if len(data) != expected:
        raise TransportError(endpoint, f"reply has {len(data)} bytes, expected {expected}; the server is faulty")
    return torch.frombuffer(bytearray(data), dtype=torch.int64).view(rows, out_features)


def scales_from_bytes(data: bytes, out_features: int, endpoint: str) -> torch.Tensor:
    """Checks and reads a stage's public output scales sent by a server (little-endian float64)."""
    if len(data) != out_features * 8:
        raise TransportError(endpoint, f"sent {len(data)} bytes of scales for {out_features} outputs; it is faulty")
    scales = torch.frombuffer(bytearray(data), dtype=torch.float64).clone()
    if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise TransportError(endpoint, "sent stage scales that are not finite and positive; the server is faulty")
    return scales


class PendingShare:
    """One server's output share, asked for and not yet collected ([`Transport.send_party`]).

    This base class makes the call only when `result()` is called (a transport that cannot send ahead).
    """

    __slots__ = ("_call", "_args")

    def __init__(self, call, *args):
        self._call, self._args = call, args

    def result(self) -> torch.Tensor:
        """The `(rows, out_features)` output share.

        Raises:
            `TransportError`: naming the endpoint that failed.
        """
        return self._call(*self._args)

    def cancel(self) -> None:
        """Gives up on the reply (it is dropped when it arrives)."""


class FeatureMapsUnavailable(NotImplementedError):
    """A feature-map request cannot be carried now (a server's data plane is unreachable); unfold and ask again."""


class Transport(ABC):
    """Carries one stage's shares to the two servers and their output shares back."""

    endpoints: tuple[str, str]
    pipelined: bool = False
    feature_maps: bool = False
    """Whether `run_stage` takes `geometry=`: a convolution's input as feature maps that the servers unfold
    (`geometry.py`); otherwise the client unfolds them into patches."""
    """Whether `send_party` sends at once and the reply waits on the wire for `result()`: the client then asks for
    party A's next products that way instead of from a background thread."""

    @abstractmethod
    def run_stage(
        self, fingerprint: str, stage: str, shares: Shares, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one stage on both servers.

        Args:
            fingerprint (`str`): the checkpoint the client expects the servers to hold.
            stage (`str`): stage name.
            shares (`Shares`): `(rows, in_features)` input shares; A gets the seed, B the share.
            out_features (`int`): expected width of the reply.

        Returns:
            `(y_a, y_b)`: the two `(rows, out_features)` output shares.

        Raises:
            `TransportError`: naming the endpoint that failed.
        """

    def run_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        """Runs one stage on one server: party 0 (A) is sent `shares.seed`, party 1 (B) `shares.b`.

        The client uses it to prepare party A's products ahead of time (A's share never depends on the data) and
        then to ask party B alone once the data is there. Transports that cannot call one party raise
        `NotImplementedError`, and the client then sends every stage to both servers at once.

        Returns:
            That server's `(rows, out_features)` output share.

        Raises:
            `TransportError`: naming the endpoint that failed.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot call one server alone")

    def send_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> PendingShare:
        """Starts [`run_party`] and returns a handle whose `result()` is its output share.

        A `pipelined` transport sends the request now and reads the reply when asked; this default makes the whole
        call inside `result()`.
        """
        return PendingShare(self.run_party, party, fingerprint, stage, shares, out_features)

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Releases connections and threads."""

    def pinned(self) -> contextlib.AbstractContextManager:
        """A context in which the calling thread makes its stage calls (the data plane pins it to a core when the
        servers share this machine; see `colocation.py`). Nothing by default."""
        return contextlib.nullcontext()

    def __deepcopy__(self, memo):
        # A transport is a connection handle: copies of configs and kwargs (transformers deep-copies
        # `from_pretrained` kwargs) must share it, not try to clone sockets and threads.
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
