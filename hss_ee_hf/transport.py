"""How output shares come back from the two servers: one small interface, two implementations.

[`Transport.run_stage`] sends party A its seed and party B its share of one stage input, and returns
both output shares. [`InProcessTransport`] calls two [`StageEngine`]s directly (same serialisation,
no network) for tests and single-machine trials; `GrpcTransport` (in `grpc_transport.py`) talks to
two `hss-ee serve` processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import torch

from .engine import PROTOCOL_VERSION, StageEngine
from .errors import StageRequestError, TransportError
from .sharing import Shares


def bytes_to_share(data: bytes, rows: int, out_features: int, endpoint: str) -> torch.Tensor:
    """Checks a reply's length and views it as an `(rows, out_features)` int64 tensor."""
    expected = rows * out_features * 8
    if len(data) != expected:
        raise TransportError(endpoint, f"reply has {len(data)} bytes, expected {expected}; the server is faulty")
    return torch.frombuffer(bytearray(data), dtype=torch.int64).view(rows, out_features)


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


class Transport(ABC):
    """Carries one stage's shares to the two servers and their output shares back."""

    endpoints: tuple[str, str]
    pipelined: bool = False
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

    def __deepcopy__(self, memo):
        # A transport is a connection handle: copies of configs and kwargs (transformers deep-copies
        # `from_pretrained` kwargs) must share it, not try to clone sockets and threads.
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessTransport(Transport):
    """Two stage engines in this process, called concurrently through the same byte interface.

    Args:
        engine_a (`StageEngine`): party A.
        engine_b (`StageEngine`, *optional*): party B (defaults to the same engine, which is exact and
            saves memory; the two parties still receive independent messages).
    """

    def __init__(self, engine_a: StageEngine, engine_b: StageEngine | None = None):
        self.engines = (engine_a, engine_b or engine_a)
        self.endpoints = ("in-process:A", "in-process:B")
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hss-ee-inproc")

    def _call(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        rows = shares.a.shape[0]
        # party A (0) is sent the 32-byte seed of its share, party B (1) its share
        payload = {"seed": shares.seed} if party == 0 else {"share": shares.b.numpy().tobytes()}
        try:
            raw = self.engines[party].compute(fingerprint, stage, rows, version=PROTOCOL_VERSION, **payload)
        except StageRequestError as err:
            raise TransportError(self.endpoints[party], f"{err.code}: {err}") from err
        return bytes_to_share(raw, rows, out_features, self.endpoints[party])

    def run_party(self, party, fingerprint, stage, shares, out_features):
        return self._call(party, fingerprint, stage, shares, out_features)

    def run_stage(self, fingerprint, stage, shares, out_features):
        fut_a = self._pool.submit(self._call, 0, fingerprint, stage, shares, out_features)
        fut_b = self._pool.submit(self._call, 1, fingerprint, stage, shares, out_features)
        return fut_a.result(), fut_b.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
