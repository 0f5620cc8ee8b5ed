"""The client's side of one linear stage: encode, share, send, reconstruct, decode (DESIGN.md §3, §4).

[`StageClient`] is the only place where plaintext activations become shares and output shares
become plaintext again. It sits between the client model (which knows HF modules) and the
transport (which knows bytes); it keeps counters a benchmark reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .checkpoint import HSSEECheckpointInfo
from .errors import CheckpointError
from .ring import decode_output, encode
from .sharing import reconstruct, share
from .transport import Transport


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
    """

    round_trips: int = 0
    rows: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    share_seconds: float = 0.0
    wait_seconds: float = 0.0
    decode_seconds: float = 0.0
    per_stage: dict[str, int] = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        self.round_trips = self.rows = self.bytes_sent = self.bytes_received = 0
        self.seconds = self.share_seconds = self.wait_seconds = self.decode_seconds = 0.0
        self.per_stage.clear()


class StageClient:
    """Runs linear stages on the two share servers for one EE checkpoint.

    Args:
        transport (`Transport`): how shares reach the servers.
        info (`HSSEECheckpointInfo`): the checkpoint's ring parameters and fingerprint.
        scales (`dict[str, torch.Tensor]`): public per-stage weight scales (stage -> `(out,)`).
        max_rows (`int`, *optional*): split larger inputs into several requests of at most this many rows.
    """

    def __init__(
        self,
        transport: Transport,
        info: HSSEECheckpointInfo,
        scales: dict[str, torch.Tensor],
        in_features: dict[str, int],
        max_rows: int = 4096,
    ):
        self.transport = transport
        self.info = info
        self.scales = {name: s.to(torch.float64) for name, s in scales.items()}
        self.in_features = in_features
        self.max_rows = max_rows
        self.stats = StageStats()

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
        outs = [
            self._run_rows(stage, rows[i : i + self.max_rows], scale) for i in range(0, rows.shape[0], self.max_rows)
        ]
        y = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], scale.numel())

    def _run_rows(self, stage: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        shares = share(encode(x, self.info.ring, x.shape[-1]))
        shared = time.perf_counter()
        y_a, y_b = self.transport.run_stage(self.info.fingerprint, stage, shares, scale.numel())
        received = time.perf_counter()
        y = decode_output(reconstruct(y_a, y_b), scale, x.shape[-1], self.info.ring)
        st = self.stats
        st.share_seconds += shared - start
        st.wait_seconds += received - shared
        st.decode_seconds += time.perf_counter() - received
        st.round_trips += 1
        st.rows += x.shape[0]
        st.bytes_sent += len(shares.seed) + shares.b.numel() * 8
        st.bytes_received += 2 * y_a.numel() * 8
        st.seconds += time.perf_counter() - start
        st.per_stage[stage] = st.per_stage.get(stage, 0) + 1
        return y
