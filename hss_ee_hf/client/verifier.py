"""Cheating-server detection: a Freivalds check per server and stage over Z_2^64 (DESIGN.md §2).

A share server is trusted to compute `y_i = x_i · W_intᵀ mod 2^64` on its input share `x_i`. The client
keeps secret random rows `R` (`t × out`, entries in {0, 1}, from the CSPRNG) and `U = R · W_int`, computed once
from the public weights. For a returned share it checks

    R · y_iᵀ == U · x_iᵀ   (mod 2^64)

which costs `O(t · (in + out))` per row instead of the server's `O(in · out)`. An honest share always passes.
A wrong one passes with probability at most `2^-t`: if a row of the error `E = y_i' - y_i` has a nonzero word
`e_j`, then for each check row `k` the two values of `R[k, j]` give sums `c` and `c + e_j`, which cannot both be
zero, so each of the `t` independent rows catches it with probability at least 1/2. This holds for every
nonzero `e_j` in Z_2^64, including `2^63` (`R` entries are 0 or 1, never even multipliers that could cancel the
top bit). `R` must stay secret: a server that knew it could craft errors in its kernel.

Every product is computed exactly in the ring. For a few rows (decoding) a plain `int64` product, whose
two's-complement wrap-around is reduction mod 2^64 (the definition of the server's work, `ring_matmul_reference`);
for many rows (prefill) the operands are split into unsigned 16-bit limbs and multiplied in float64, where every
partial sum stays below 2^53, then recombined with wrapping int64 shifts. Tests prove both against Python integers.

[`VerifyingTransport`] wraps any transport and checks both replies of every stage before they are used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import numpy as np
import torch
from transformers import AutoConfig

from ..artifacts.checkpoint import HSSEECheckpointInfo
from ..artifacts.weights import iter_stage_weights
from ..errors import StageError, TransportError
from ..ring.csprng import ChaChaStream
from ..ring.limbs import LIMB16_BITS, MAX_EXACT_INNER16, N_LIMBS16, binary_matmul_nt, ring_matmul_nt, to_limbs
from ..ring.sharing import Shares
from ..transport.base import Transport

logger = logging.getLogger(__name__)

DEFAULT_CHECK_ROWS = 40
# Partial sums must stay exact in float64 (< 2^53): R·limbs(y) sums out words of < 2^16, limbs(U)·limbs(x)
# sums in products of < 2^32; U = R·W_int itself sums out weights of < 2^15.
_MAX_EXACT_OUT = 1 << 37
# Rows of x or y expanded to float64 limbs at once (bounds the client's extra memory).
_CHUNK_ELEMENTS = 1 << 22
# Up to about this many rows the int64 product beats the limb GEMMs (measured on a 2-core VM, one thread).
_INT64_MAX_ROWS = 4


class CheatingServerError(TransportError):
    """A share server returned an output share that fails the Freivalds check: it is faulty or cheating.

    The reply was not used. Stop sending requests to this server and report it to whoever runs it.

    Args:
        endpoint (`str`): the server whose share failed.
        message (`str`): which stage failed and what to do.
    """


class FreivaldsVerifier:
    """Checks output shares against secret Freivalds rows, one set per stage.

    Args:
        weights (`Iterable[tuple[str, torch.Tensor]]`): `(stage name, W_int)` pairs, `W_int` the `(out, in)`
            integer weight the servers multiply with.
        rows (`int`, *optional*, defaults to 40): `t`, secret check rows per stage. A wrong share passes with
            probability at most `2^-t`; the client's extra work grows linearly in `t`.
        rng (`ChaChaStream`, *optional*): where the secret rows come from; a fresh stream keyed from
            `os.urandom` when omitted (pass one only in tests).

    Example:

    ```python
    >>> verifier = FreivaldsVerifier.from_checkpoint("smollm2-ee")
    >>> y_a, y_b = transport.run_stage(fingerprint, "layers.0.qkv", shares, out_features=960)
    >>> verifier.check_stage("layers.0.qkv", shares, y_a, y_b, transport.endpoints)  # raises CheatingServerError
    ```
    """

    def __init__(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        rows: int = DEFAULT_CHECK_ROWS,
        rng: ChaChaStream | None = None,
    ):
        if not 1 <= rows <= 256:
            raise ValueError(f"rows (the number of secret check rows) must be in [1, 256], got {rows}")
        rng = rng if rng is not None else ChaChaStream(os.urandom(32))
        self.rows = rows
        self._r: dict[str, torch.Tensor] = {}  # (t, out) 0/1 as uint8: compact, widened per check
        self._u: dict[str, torch.Tensor] = {}  # (t, in) int64, U = R · W_int (exact, |U| < out * 2^15)
        # Limbs of U, (4, t, in), made on the first check with many rows; float32 holds 16-bit limbs exactly.
        self._u_limbs: dict[str, torch.Tensor] = {}
        self.dims: dict[str, tuple[int, int]] = {}
        self.checks = 0
        self.seconds = 0.0
        for name, w_int in weights:
            out_f, in_f = w_int.shape
            if out_f >= _MAX_EXACT_OUT or in_f >= MAX_EXACT_INNER16:
                raise ValueError(f"stage {name} of shape {tuple(w_int.shape)} exceeds the exact-check bounds")
            if w_int.numel() and w_int.abs().max().item() >= 1 << 15:
                raise ValueError(f"stage {name}: integer weights must be below 2^15 in magnitude")
            bits = np.unpackbits(np.frombuffer(rng.bytes((rows * out_f + 7) // 8), dtype=np.uint8))[: rows * out_f]
            r = torch.from_numpy(bits.reshape(rows, out_f).copy())
            # Exact in float64: each entry of U sums at most out weights of magnitude < 2^15.
            u = (r.to(torch.float64) @ w_int.to(torch.float64)).to(torch.int64)
            self._r[name], self._u[name], self.dims[name] = r, u, (in_f, out_f)

    def __repr__(self) -> str:  # never show the secret rows
        return f"FreivaldsVerifier(stages={len(self.dims)}, rows={self.rows})"

    @classmethod
    def from_checkpoint(
        cls,
        folder: str | os.PathLike,
        rows: int = DEFAULT_CHECK_ROWS,
        rng: ChaChaStream | None = None,
        progress: bool = False,
    ) -> FreivaldsVerifier:
        """Builds a verifier from an EE checkpoint folder that holds the stage weights (the server's files).

        Args:
            folder (`str` or `os.PathLike`): a local EE checkpoint with its weight shards
                (`hub.resolve_server_files` fetches them for a Hub id).
            rows (`int`, *optional*, defaults to 40): secret check rows per stage.
            rng (`ChaChaStream`, *optional*): source of the secret rows (tests only).
            progress (`bool`, *optional*): show a progress bar while reading the weights.

        Raises:
            `CheckpointError`: the folder is not an EE checkpoint or lacks stage weights.
        """
        info = HSSEECheckpointInfo.from_folder(folder)
        config = AutoConfig.from_pretrained(folder)
        weights = ((stage.name, w_int) for stage, w_int, _ in iter_stage_weights(folder, config, info.ring, progress))
        return cls(weights, rows=rows, rng=rng)

    def _sides(self, stage: str, x_share: torch.Tensor, y_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(R · yᵀ, U · xᵀ)` mod 2^64, each `(t, n)`."""
        if x_share.shape[0] <= _INT64_MAX_ROWS:
            return self._r[stage].to(torch.int64) @ y_share.T, self._u[stage] @ x_share.T  # wrap = mod 2^64
        u_limbs = self._u_limbs.get(stage)
        if u_limbs is None:
            u_limbs = self._u_limbs[stage] = to_limbs(self._u[stage], LIMB16_BITS).to(torch.float32)
        r, u_limbs = self._r[stage].to(torch.float64), u_limbs.to(torch.float64)
        in_f, out_f = self.dims[stage]
        step = max(1, _CHUNK_ELEMENTS // (N_LIMBS16 * max(in_f, out_f)))
        lhs, rhs = [], []
        for i in range(0, x_share.shape[0], step):
            lhs.append(binary_matmul_nt(r, y_share[i : i + step]))
            rhs.append(ring_matmul_nt(u_limbs, x_share[i : i + step]))
        return torch.cat(lhs, dim=1), torch.cat(rhs, dim=1)

    def _verify(self, stage: str, parts: list[tuple[torch.Tensor, torch.Tensor, str]]) -> None:
        """Checks `(x_share, y_share, endpoint)` triples of one stage with one product per side."""
        start = time.perf_counter()
        dims = self.dims.get(stage)
        if dims is None:
            raise StageError(
                f"the integrity verifier has no check rows for stage {stage!r}; build it from the same EE "
                "checkpoint the client loads"
            )
        in_f, out_f = dims
        for x_share, y_share, endpoint in parts:
            if x_share.dim() != 2 or x_share.shape[1] != in_f or x_share.dtype != torch.int64:
                raise StageError(f"stage {stage} takes (n, {in_f}) int64 input shares, got {tuple(x_share.shape)}")
            if y_share.shape != (x_share.shape[0], out_f) or y_share.dtype != torch.int64:
                raise CheatingServerError(
                    endpoint,
                    f"stage {stage}: the output share has shape {tuple(y_share.shape)}, expected "
                    f"({x_share.shape[0]}, {out_f}); the server is faulty or cheating, stop using it",
                )
        # Both parties' rows in one product: fewer, larger matrix products.
        x = torch.cat([p[0].cpu() for p in parts]) if len(parts) > 1 else parts[0][0].cpu()
        y = torch.cat([p[1].cpu() for p in parts]) if len(parts) > 1 else parts[0][1].cpu()
        lhs, rhs = self._sides(stage, x, y)
        failed_rows = (lhs != rhs).any(dim=0)  # per input row
        self.checks += len(parts)
        self.seconds += time.perf_counter() - start
        offset = 0
        for x_share, _, endpoint in parts:
            failed = failed_rows[offset : offset + x_share.shape[0]]
            offset += x_share.shape[0]
            if bool(failed.any()):
                logger.warning("integrity check failed: stage %s from %s", stage, endpoint)
                raise CheatingServerError(
                    endpoint,
                    f"stage {stage}: the output share fails the Freivalds integrity check in {int(failed.sum())} "
                    f"of {failed.numel()} rows, so it is not x·Wᵀ for the input this server was sent. The server is "
                    "faulty or cheating; the reply was discarded. Stop using this server and tell whoever runs it",
                )

    def check(self, stage: str, x_share: torch.Tensor, y_share: torch.Tensor, endpoint: str) -> None:
        """Checks one server's output share of one stage.

        Args:
            stage (`str`): stage name, e.g. `"layers.0.qkv"`.
            x_share (`torch.Tensor`): `(n, in_features)` int64, the input share this server was sent (for
                party A the share its seed expands to: `Shares.a`).
            y_share (`torch.Tensor`): `(n, out_features)` int64, the output share it returned.
            endpoint (`str`): the server, named in the error.

        Raises:
            `CheatingServerError`: the share is wrong (names `endpoint`).
            `StageError`: the verifier has no rows for `stage`, or `x_share` has the wrong shape (a client bug).
        """
        self._verify(stage, [(x_share, y_share, endpoint)])

    def check_stage(
        self, stage: str, shares: Shares, y_a: torch.Tensor, y_b: torch.Tensor, endpoints: tuple[str, str]
    ) -> None:
        """Checks both servers' output shares of one stage call.

        Args:
            stage (`str`): stage name.
            shares (`Shares`): the input shares that were sent (`a` to party A as its seed, `b` to party B).
            y_a (`torch.Tensor`): party A's output share.
            y_b (`torch.Tensor`): party B's output share.
            endpoints (`tuple[str, str]`): the two servers (`Transport.endpoints`).

        Raises:
            `CheatingServerError`: naming the server whose share is wrong (party A if both are).
        """
        self._verify(stage, [(shares.a, y_a, endpoints[0]), (shares.b, y_b, endpoints[1])])


class VerifyingTransport(Transport):
    """Wraps a transport so that both output shares of every stage are Freivalds-checked before use.

    Args:
        inner (`Transport`): the transport that reaches the servers (`GrpcTransport`, `InProcessTransport`).
        verifier (`FreivaldsVerifier`): check rows built from the same EE checkpoint.

    Example:

    ```python
    >>> verifier = FreivaldsVerifier.from_checkpoint("smollm2-ee")
    >>> transport = VerifyingTransport(GrpcTransport(("10.0.0.1:50051", "10.0.0.2:50051")), verifier)
    >>> model = HSSEEForCausalLM.from_pretrained("smollm2-ee", key="smollm2.hss-ee-key", transport=transport)
    ```
    """

    def __init__(self, inner: Transport, verifier: FreivaldsVerifier):
        self.inner = inner
        self.verifier = verifier
        self.endpoints = inner.endpoints

    def run_stage(
        self, fingerprint: str, stage: str, shares: Shares, out_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs one stage on the inner transport and checks both replies; see [`Transport.run_stage`].

        Raises:
            `CheatingServerError`: a reply fails the check (names the server).
            `TransportError`: the inner transport failed.
        """
        y_a, y_b = self.inner.run_stage(fingerprint, stage, shares, out_features)
        self.verifier.check_stage(stage, shares, y_a, y_b, self.endpoints)
        return y_a, y_b

    def run_party(self, party: int, fingerprint: str, stage: str, shares: Shares, out_features: int) -> torch.Tensor:
        """Runs one stage on one server and checks its reply; see [`Transport.run_party`].

        Raises:
            `CheatingServerError`: the reply fails the check (names the server).
        """
        y = self.inner.run_party(party, fingerprint, stage, shares, out_features)
        self.verifier.check(stage, shares.a if party == 0 else shares.b, y, self.endpoints[party])
        return y

    def pinned(self):
        return self.inner.pinned()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # `describe`, `check_fingerprint`, ... of the inner transport (only reached for missing attributes).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
