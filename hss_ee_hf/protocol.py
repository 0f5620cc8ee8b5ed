"""The client's side of one linear stage: encode, share, send, reconstruct, decode (DESIGN.md §3, §4).

[`StageClient`] is the only place where plaintext activations become shares and output shares
become plaintext again. It sits between the client model (which knows HF modules) and the
transport (which knows bytes); it keeps counters a benchmark reads.

Offline/online split: party A's share is a function of a fresh seed only, never of the data, so its
product `x_A @ W_int.T` can be computed before the data exists. After each stage call of `n` rows the
client asks party A for its product under the next seed of that stage and shape. The next call of the same
stage and shape then only has to wait for party B (`x_B = x - x_A`); party A's work overlaps the client's own
nonlinear work. Every seed (every mask row) is used once. What each server receives is unchanged (A: 32-byte
seeds, B: uniformly random shares); A's requests no longer line up with the user's tokens in time.

On a `pipelined` transport (the data plane) asking is only a write whose reply waits on the wire until a call
reads it, with no thread involved, and one request prepares several future calls ([`PreparedProducts`]).
Other transports ask for one call at a time from one background thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from .checkpoint import HSSEECheckpointInfo
from .errors import CheckpointError, TransportError
from .prepared import PreparedProducts
from .ring import StageCodec
from .sharing import Shares, mask_for, share, share_with
from .transport import Transport

logger = logging.getLogger(__name__)
PRECOMPUTE_MAX_ROWS = 16
"""Party A's products are prepared only for calls of at most this many rows (decode steps of a batch): a prompt's
shape rarely comes back, and preparing for it would double party A's prefill work for nothing."""
_Prepared = tuple[bytes, torch.Tensor, torch.Tensor]  # (seed, party A's share, party A's output share)


@dataclass
class StageStats:
    """Counters of what a client sent and received (for benchmarks and tests).

    Attributes:
        round_trips (`int`): stage calls (each one goes to both servers concurrently).
        rows (`int`): input rows sent.
        bytes_sent (`int`): payload bytes sent to both servers together.
        bytes_received (`int`): payload bytes received from both servers together.
        seconds (`float`): wall time spent inside stage calls, all of the below together.
        share_seconds (`float`): encoding and sharing (client-side cryptography).
        wait_seconds (`float`): waiting for the two servers (network, (de)serialisation, server compute).
        decode_seconds (`float`): reconstruction and decoding.
        precomputed (`int`): stage calls whose party-A product was prepared ahead of time (only party B was
            waited for).
    """

    round_trips: int = 0
    rows: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    share_seconds: float = 0.0
    wait_seconds: float = 0.0
    decode_seconds: float = 0.0
    precomputed: int = 0
    per_stage: dict[str, int] = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        self.round_trips = self.rows = self.bytes_sent = self.bytes_received = self.precomputed = 0
        self.seconds = self.share_seconds = self.wait_seconds = self.decode_seconds = 0.0
        self.per_stage.clear()


class StageClient:
    """Runs linear stages on the two share servers for one EE checkpoint.

    Args:
        transport (`Transport`): how shares reach the servers.
        info (`HSSEECheckpointInfo`): the checkpoint's ring parameters and fingerprint.
        scales (`dict[str, torch.Tensor]`): public per-stage weight scales (stage -> `(out,)`).
        max_rows (`int`, *optional*): split larger inputs into several requests of at most this many rows.
        precompute (`bool`, *optional*, defaults to `True`): prepare party A's products ahead of time (see the
            module docstring); needs a transport with `run_party`.
    """

    def __init__(
        self,
        transport: Transport,
        info: HSSEECheckpointInfo,
        scales: dict[str, torch.Tensor],
        in_features: dict[str, int],
        max_rows: int = 4096,
        precompute: bool = True,
    ):
        self.transport = transport
        self.info = info
        self.scales = {name: s.to(torch.float64) for name, s in scales.items()}
        self.in_features = in_features
        self.max_rows = max_rows
        self.stats = StageStats()
        self._codecs: dict[str, StageCodec] = {}
        # On a pipelined transport, party A's products prepared in chunks; otherwise (stage, rows) -> a future of one
        # background worker (party A is one server and its requests need no parallelism).
        self._pipelined = precompute and transport.pipelined
        self._prepared_a = PreparedProducts(transport, info.fingerprint, max_rows) if self._pipelined else None
        self._ready: dict[tuple[str, int], Future] = {}
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hss-ee-precompute")
            if precompute and not self._pipelined
            else None
        )

    def run(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """Computes `x @ W_stage.T` on the servers without either of them seeing `x`.

        Args:
            stage (`str`): stage name, e.g. `"layers.0.qkv"`.
            x (`torch.Tensor`): `(..., in_features)` activations.

        Returns:
            `torch.Tensor` of shape `(..., out_features)` and the dtype of `x`.

        Raises:
            `RingOverflowError`: `x` is outside the fixed-point range, or a reply was corrupted.
            `TransportError`: a server failed (the error names it).
        """
        codec = self._codecs.get(stage)
        if codec is None:
            codec = self._codec(stage)
        in_features = codec.in_features
        if x.shape[-1] != in_features:
            raise ValueError(f"stage {stage} takes {in_features} features, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, in_features)
        if rows.requires_grad:
            rows = rows.detach()
        if rows.shape[0] <= self.max_rows:
            y = self._run_rows(stage, rows, codec, x.dtype)
        else:
            y = torch.cat(
                [
                    self._run_rows(stage, rows[i : i + self.max_rows], codec, x.dtype)
                    for i in range(0, len(rows), self.max_rows)
                ]
            )
        if not x.is_cpu:
            y = y.to(device=x.device)
        return y.view(*x.shape[:-1], codec.out_features)

    def _codec(self, stage: str) -> StageCodec:
        scale = self.scales.get(stage)
        if scale is None:
            raise CheckpointError(f"stage {stage!r} has no weight scales; the checkpoint's scales file is incomplete")
        codec = self._codecs[stage] = StageCodec(self.info.ring, self.in_features[stage], scale)
        return codec

    def _prepare(self, stage: str, rows: int, in_features: int, out_features: int) -> _Prepared:
        """Party A's output share under a fresh mask, before the data exists (runs on the background worker)."""
        seed, a = mask_for((rows, in_features))
        only_a = Shares(seed=seed, a=a, b=torch.empty(0, dtype=torch.int64))  # party B's share does not exist yet
        return seed, a, self.transport.run_party(0, self.info.fingerprint, stage, only_a, out_features)

    def _schedule(self, stage: str, rows: int, in_features: int, out_features: int) -> None:
        if rows > PRECOMPUTE_MAX_ROWS:
            return
        if self._prepared_a is not None:
            self._prepared_a.top_up(stage, rows, in_features, out_features)
            return
        if self._pool is None or (stage, rows) in self._ready:
            return
        try:
            self._ready[(stage, rows)] = self._pool.submit(self._prepare, stage, rows, in_features, out_features)
        except RuntimeError:  # the pool is shut down (the client was closed)
            pass

    def _prepared(self, stage: str, rows: int) -> _Prepared | None:
        """A prepared party-A product for this stage and shape, or `None` (then both servers are asked)."""
        future = self._ready.pop((stage, rows), None)
        if future is None:
            return None
        try:
            return future.result()
        except NotImplementedError:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None  # this transport cannot call one server: ask both, always
        except TransportError as err:  # a failed background call: the ordinary path retries and reports it
            logger.debug("precomputed product for %s unavailable (%s); asking both servers", stage, type(err).__name__)
        return None

    def wait_prepared(self) -> None:
        """Waits until every party-A product asked for ahead of time has arrived (or failed)."""
        if self._prepared_a is not None:
            self._prepared_a.wait()
        wait(list(self._ready.values()))

    def close(self) -> None:
        """Stops preparing party A's products (the transport is closed by its owner)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._prepared_a is not None:
            self._prepared_a.clear()
            self._prepared_a, self._pipelined = None, False
        self._ready.clear()

    def _run_rows(self, stage: str, x: torch.Tensor, codec: StageCodec, dtype: torch.dtype) -> torch.Tensor:
        start = time.perf_counter()
        rows, in_features, out_features = x.shape[0], codec.in_features, codec.out_features
        encoded = codec.encode(x)
        encoded_at = time.perf_counter()
        waited = 0.0
        if self._prepared_a is not None:
            prepared = self._prepared_a.take(stage, rows)
        elif self._pool is not None:
            prepared = self._prepared(stage, rows)  # may wait for party A
            waited = time.perf_counter() - encoded_at
        else:
            prepared = None
        if prepared is not None and self._prepared_a is not None:
            seed, a, chunk, index = prepared
            shares = share_with(encoded, seed, a)
            shared = time.perf_counter()
            pending_b = self.transport.send_party(1, self.info.fingerprint, stage, shares, out_features)
            try:
                y_a = self._prepared_a.collect(chunk, index, rows)  # on the wire already, normally
            except BaseException:
                pending_b.cancel()
                raise
            y_b = pending_b.result()
            # Party A is asked for more only now: on a machine that also runs party B, A then computes while the
            # client does its own work rather than while B does.
            self._schedule(stage, rows, in_features, out_features)
            self.stats.precomputed += 1
        elif prepared is not None:
            seed, a, y_a = prepared
            shares = share_with(encoded, seed, a)
            shared = time.perf_counter()
            y_b = self.transport.run_party(1, self.info.fingerprint, stage, shares, out_features)
            self.stats.precomputed += 1
            self._schedule(stage, rows, in_features, out_features)
        else:
            shares = share(encoded)
            shared = time.perf_counter()
            y_a, y_b = self.transport.run_stage(self.info.fingerprint, stage, shares, out_features)
            self._schedule(stage, rows, in_features, out_features)
        received = time.perf_counter()
        y = codec.decode(y_a, y_b, dtype)
        st = self.stats
        st.share_seconds += shared - start - waited
        st.wait_seconds += received - shared + waited
        st.decode_seconds += time.perf_counter() - received
        st.round_trips += 1
        st.rows += x.shape[0]
        st.bytes_sent += len(shares.seed) + shares.b.numel() * 8
        st.bytes_received += 2 * y.numel() * 8
        st.seconds += time.perf_counter() - start
        st.per_stage[stage] = st.per_stage.get(stage, 0) + 1
        return y
