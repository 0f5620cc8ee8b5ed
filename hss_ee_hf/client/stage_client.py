"""The client's side of one linear stage: encode, share, send, reconstruct, decode (DESIGN.md §3, §4).

[`StageClient`] is the only place where plaintext activations become shares and output shares
become plaintext again. It sits between the client model (which knows HF modules) and the
transport (which knows bytes); it keeps counters a benchmark reads.

Offline/online split: party A's share is a function of a fresh seed only, never of the data, so its
product `x_A @ W_int.T` can be computed before the data exists. After each stage call of `n` rows the
client asks party A, in the background, for its product under the next seed of that stage and shape.
The next call of the same stage and shape then only has to wait for party B (`x_B = x - x_A`); party A's
work overlaps the client's own nonlinear work. Every seed is used once. What each server receives is
unchanged (A: 32-byte seeds, B: uniformly random shares); A's requests no longer line up with the user's
tokens in time.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from transformers.utils.logging import tqdm

from ..artifacts.checkpoint import HSSEECheckpointInfo
from ..errors import CheckpointError, TransportError
from ..ring.fixed_point import decode_output, encode
from ..ring.sharing import Shares, mask_for, reconstruct, share, share_with
from ..transport.base import Transport

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
        # (stage, rows) -> party A's product under a seed prepared ahead of time; one background worker, as
        # party A is one server and its requests need no parallelism.
        self._ready: dict[tuple[str, int], Future] = {}
        # One model may serve many threads: the prepared products (each seed is used exactly once), the pool and
        # the counters are shared, so they change under this lock (held for dictionary work only, never a call).
        self._lock = threading.Lock()
        self._progress = threading.local()  # .bar: this thread's prefill progress bar, see `_advance_progress`
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hss-ee-precompute") if precompute else None

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
        scale = self.scales.get(stage)
        if scale is None:
            raise CheckpointError(f"stage {stage!r} has no weight scales; the checkpoint's scales file is incomplete")
        in_features = self.in_features[stage]
        if x.shape[-1] != in_features:
            raise ValueError(f"stage {stage} takes {in_features} features, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, in_features)
        if rows.shape[0] == 0:  # the product of no rows is no rows, as in plaintext; nothing to send
            return x.new_zeros(*x.shape[:-1], scale.numel())
        if rows.shape[0] <= self.max_rows:
            self._end_progress()
            y = self._run_rows(stage, rows, scale)
        else:
            step = self.max_rows
            outs = [self._run_rows(stage, rows[i : i + step], scale) for i in range(0, rows.shape[0], step)]
            y = torch.cat(outs, dim=0)
            self._advance_progress(rows.shape[0], len(outs))
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], scale.numel())

    def _advance_progress(self, rows: int, requests: int) -> None:
        """Counts one split stage call on this thread's prefill progress bar (a long prompt's pass can take minutes).

        The bar spans the stages of one pass, is transformers' `tqdm` (so `transformers.utils.logging
        .disable_progress_bar()` hides it) and belongs to the calling thread, as passes of several threads interleave.
        """
        bar = getattr(self._progress, "bar", None)
        if bar is None:
            bar = tqdm(
                total=len(self.in_features),
                unit="stage",
                desc=f"HSS-EE prefill: {rows} rows, {requests} requests per stage (max_rows={self.max_rows})",
            )
            self._progress.bar = bar
        bar.update(1)
        if bar.n >= bar.total:
            self._end_progress()

    def _end_progress(self) -> None:
        bar = getattr(self._progress, "bar", None)
        if bar is not None:
            if bar.n < bar.total:  # the pass's last stages took few rows (the lm_head of the last position only)
                bar.total = bar.n
            bar.close()
            self._progress.bar = None

    def _prepare(self, stage: str, rows: int, in_features: int, out_features: int) -> _Prepared:
        """Party A's output share under a fresh mask, before the data exists (runs on the background worker)."""
        seed, a = mask_for((rows, in_features))
        only_a = Shares(seed=seed, a=a, b=torch.empty(0, dtype=torch.int64))  # party B's share does not exist yet
        return seed, a, self.transport.run_party(0, self.info.fingerprint, stage, only_a, out_features)

    def _schedule(self, stage: str, rows: int, in_features: int, out_features: int) -> None:
        with self._lock:
            if self._pool is None or rows > PRECOMPUTE_MAX_ROWS or (stage, rows) in self._ready:
                return
            try:
                self._ready[(stage, rows)] = self._pool.submit(self._prepare, stage, rows, in_features, out_features)
            except RuntimeError:  # the pool is shut down (the client was closed)
                pass

    def _prepared(self, stage: str, rows: int) -> _Prepared | None:
        """A prepared party-A product for this stage and shape, or `None` (then both servers are asked)."""
        with self._lock:  # a prepared seed goes to exactly one caller
            future = self._ready.pop((stage, rows), None)
        if future is None:
            return None
        try:
            return future.result()
        except NotImplementedError:
            with self._lock:
                pool, self._pool = self._pool, None  # this transport cannot call one server: ask both, always
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        except TransportError as err:  # a failed background call: the ordinary path retries and reports it
            logger.debug("precomputed product for %s unavailable (%s); asking both servers", stage, type(err).__name__)
        return None

    def wait_prepared(self) -> None:
        """Waits until every party-A product asked for ahead of time has arrived (or failed)."""
        with self._lock:
            pending = list(self._ready.values())
        wait(pending)

    def close(self) -> None:
        """Stops preparing party A's products (the transport is closed by its owner)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._ready.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _run_rows(self, stage: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        rows, in_features, out_features = x.shape[0], x.shape[-1], scale.numel()
        encoded = encode(x, self.info.ring, in_features)
        encoded_at = time.perf_counter()
        prepared = self._prepared(stage, rows) if self._pool is not None else None  # may wait for party A
        waited = time.perf_counter() - encoded_at
        if prepared is not None:
            seed, a, y_a = prepared
            shares = share_with(encoded, seed, a)
            shared = time.perf_counter()
            y_b = self.transport.run_party(1, self.info.fingerprint, stage, shares, out_features)
            with self._lock:
                self.stats.precomputed += 1
        else:
            shares = share(encoded)
            shared = time.perf_counter()
            y_a, y_b = self.transport.run_stage(self.info.fingerprint, stage, shares, out_features)
        received = time.perf_counter()
        self._schedule(stage, rows, in_features, out_features)
        y = decode_output(reconstruct(y_a, y_b), scale, x.shape[-1], self.info.ring)
        st = self.stats
        with self._lock:  # `+=` on shared counters is not atomic across threads
            st.share_seconds += shared - start - waited
            st.wait_seconds += received - shared + waited
            st.decode_seconds += time.perf_counter() - received
            st.round_trips += 1
            st.rows += rows
            st.bytes_sent += len(shares.seed) + shares.b.numel() * 8
            st.bytes_received += 2 * y_a.numel() * 8
            st.seconds += time.perf_counter() - start
            st.per_stage[stage] = st.per_stage.get(stage, 0) + 1
        return y
