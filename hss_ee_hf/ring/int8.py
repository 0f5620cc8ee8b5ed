"""The int8 ring kernel: exact `x @ W_int.T mod 2^64` on int8 tensor cores, reading 2 bytes per weight.

A decode step on a GPU is bound by the bytes it reads, and the float64 kernel reads 8 per weight. This one holds the
16-bit weight once as two signed byte limbs and multiplies them with `torch._int_mm` (int8 x int8 -> int32, exact
integer GEMM on tensor cores; the same call runs on CPU tensors, so CI proves the GPU's code path without a GPU).

The decomposition (DESIGN.md §4), with every limb a signed byte in [-128, 127] as `_int_mm` requires:

* **Weight**, `w` in [-2^15, 2^15): `hi = w >> 8` (floor) lies in [-128, 127] and `lo = (w & 255) - 128` in
  [-128, 127], so `256·hi + lo = w - 128` over the integers. A plain `lo = w & 255` would not fit int8, and a
  rounded `lo` in [-128, 127] pushes `hi` to 128 for `w >= 2^15 - 128`; the constant 128 taken out instead is put
  back as `128 · sum_i x_i`, one wrapping row sum per product (O(n · in), not O(n · in · out)).
* **Share**, any `x` in Z_2^64: with `C = 0x8080...80` (128 in every byte), the bytes `u_k` of `x + C mod 2^64` give
  `b_k = u_k - 128` in [-128, 127], and `sum_k b_k 2^(8k) = (x + C) - C = x mod 2^64`. On little-endian machines
  `b_k` is byte `k` of `(x + C) ^ C` read as int8: no carry chain, two element-wise ops.
* **Product**: `y = sum_k 2^(8k) (B_k @ lo.T + 256 · B_k @ hi.T) + 128 · rowsum(x) mod 2^64`. The eight share limbs
  are stacked as the rows of one `(8n, in)` matrix and both weight limbs as the columns of one `(in, 2·out)` matrix,
  so a whole product is one `_int_mm`; the partial sums are widened to int64 and recombined with wrapping shifts.

Exactness bound: every int32 entry is `sum_i b_i · l_i` with `|b_i|, |l_i| <= 128`, so its magnitude is at most
`128 · 128 · in = 2^14 · in`, at most `2^31 - 1` exactly when `in <= 2^17 - 1`: [`MAX_IN_FEATURES_INT8`]. Int32
accumulation is then exact in any order, and everything after it is int64 arithmetic mod 2^64.

CUDA's `_int_mm` asks for more than the CPU's: more than 16 rows, inner and output sizes multiples of 8, and (for
cuBLASLt's int8 path) the second operand column-major. The weight is padded once when held, the share per call, with
zeros, which add nothing to any sum (the CPU's `_int_mm` also needs an inner size of at least 2). Where `_int_mm` is
missing or refuses (an old GPU), the same limbs go through a float64 GEMM instead, exact because `2^14 · in < 2^53`.
"""

from __future__ import annotations

import functools
import logging
import sys

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MAX_IN_FEATURES_INT8 = (1 << 17) - 1  # 2^14 · in <= 2^31 - 1
N_SHARE_LIMBS = 8
_WEIGHT_MIN, _WEIGHT_MAX = -(1 << 15), (1 << 15) - 1
_BIAS = 0x8080808080808080 - (1 << 64)  # C = 128 in every byte, as a signed int64
# Bound on the int32 partial-sum block of one chunk of rows: caps a prefill's scratch memory, keeps row blocks large.
_CHUNK_BYTES = 1 << 28
_CUDA_MIN_ROWS = 17  # torch's CUDA _int_mm: "self.size(0) needs to be greater than 16"
_CUDA_ALIGN = 8  # ... and inner / output sizes multiples of 8


def share_byte_limbs(x: torch.Tensor) -> torch.Tensor:
    """`(n, in)` int64 ring elements -> `(8, n, in)` signed byte limbs with `x = sum_k b_k 2^(8k) mod 2^64`.

    Args:
        x (`torch.Tensor`): int64 shares, any values.

    Returns:
        `torch.Tensor`: int8, limb `k` (least significant first) in row block `k`, each in [-128, 127].
    """
    biased = x + _BIAS  # wraps mod 2^64, as the ring does
    if sys.byteorder == "little":
        digits = (biased ^ _BIAS).contiguous().view(torch.int8).view(*x.shape, N_SHARE_LIMBS)
        return digits.movedim(-1, 0).contiguous()
    return torch.stack([(((biased >> (8 * k)) & 0xFF) - 128).to(torch.int8) for k in range(N_SHARE_LIMBS)])


def weight_byte_limbs(w_int: torch.Tensor) -> torch.Tensor:
    """`(out, in)` weight in [-2^15, 2^15) -> `(2·out, in)` int8, `lo` rows then `hi` rows: `256·hi + lo = w - 128`.

    Raises:
        `ValueError`: a weight lies outside [-2^15, 2^15).
    """
    w = w_int.to(torch.int64)
    if w.numel() and (w.min().item() < _WEIGHT_MIN or w.max().item() > _WEIGHT_MAX):
        raise ValueError(f"int8-kernel weights must lie in [{_WEIGHT_MIN}, {_WEIGHT_MAX}]; quantise to 16 bits first")
    return torch.cat([(w & 0xFF) - 128, w >> 8]).to(torch.int8)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _inner_padded(in_features: int, align: int) -> int:
    # torch 2.13's CPU `_int_mm` returns uninitialised memory for an inner size of 1 (tests/test_int8_kernel.py
    # pins this): a zero column makes it 2 and changes no sum.
    return max(_round_up(in_features, align), 2)


@functools.cache
def int_mm_works(device: torch.device) -> bool:
    """Whether `torch._int_mm` runs and is exact on `device` (old GPUs and builds may lack it); probed once per device.

    Args:
        device (`torch.device`): where the products will run.
    """
    if not hasattr(torch, "_int_mm"):
        logger.warning("torch._int_mm is missing in torch %s; the int8 kernel uses float64 GEMMs", torch.__version__)
        return False
    rows, inner = _round_up(_CUDA_MIN_ROWS, _CUDA_ALIGN), 2 * _CUDA_ALIGN
    a = torch.full((rows, inner), -128, dtype=torch.int8, device=device)
    b = torch.full((2 * _CUDA_ALIGN, inner), -128, dtype=torch.int8, device=device)
    try:
        got = torch._int_mm(a, b.T)
    except RuntimeError as err:
        logger.warning("torch._int_mm failed on %s (%s); the int8 kernel uses float64 GEMMs", device, err)
        return False
    if not bool((got == inner * (1 << 14)).all()):
        logger.warning("torch._int_mm is inexact on %s; the int8 kernel uses float64 GEMMs", device)
        return False
    return True


class Int8RingWeight:
    """A 16-bit ring weight held as two int8 limbs (2 bytes per weight) for exact int8-GEMM ring products.

    Args:
        w_int (`torch.Tensor`): `(out, in)` integer weight in [-2^15, 2^15), `in <= MAX_IN_FEATURES_INT8`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to hold it.
        pad (`bool`, *optional*): pad to CUDA `_int_mm`'s shape rules; defaults to `True` on CUDA. Tests set it on
            CPU to run the padded path.
        use_int_mm (`bool`, *optional*): `True` forces `torch._int_mm`, `False` the float64 path over the same limbs;
            by default a small probe product on `device` decides.

    Example:

    ```python
    >>> weight = Int8RingWeight(w_int, device="cuda")
    >>> y = weight.matmul(x)  # == x @ w_int.T mod 2^64, exactly
    ```
    """

    def __init__(
        self,
        w_int: torch.Tensor,
        device: str | torch.device = "cpu",
        pad: bool | None = None,
        use_int_mm: bool | None = None,
    ):
        if w_int.dim() != 2:
            raise ValueError(f"a ring weight must be 2-D (out, in), got shape {tuple(w_int.shape)}")
        self.out_features, self.in_features = w_int.shape
        if self.in_features > MAX_IN_FEATURES_INT8:
            raise ValueError(
                f"in_features {self.in_features} exceeds the int8 kernel's exactness bound {MAX_IN_FEATURES_INT8} "
                "(int32 partial sums); use the float64 or native kernel for this stage"
            )
        self.device = torch.device(device)
        self.pad = self.device.type == "cuda" if pad is None else pad
        align = _CUDA_ALIGN if self.pad else 1
        self._in_padded = _inner_padded(self.in_features, align)
        # 2·out must be a multiple of 8: pad out to a multiple of 4. Padded limb rows are zeros, their outputs dropped.
        self._out_padded = _round_up(max(self.out_features, 1), align // 2 or 1)
        limbs = weight_byte_limbs(w_int).view(2, self.out_features, self.in_features)
        limbs = F.pad(limbs, (0, self._in_padded - self.in_features, 0, self._out_padded - self.out_features))
        # (2·out, in) row-major; its transpose is the column-major (in, 2·out) operand cuBLASLt's int8 GEMM wants.
        self._limbs = limbs.reshape(2 * self._out_padded, self._in_padded).contiguous().to(self.device)
        self.use_int_mm = int_mm_works(self.device) if use_int_mm is None else use_int_mm

    @property
    def nbytes(self) -> int:
        """Bytes held (and read per product): 2 per weight, plus any padding."""
        return self._limbs.numel() * self._limbs.element_size()

    def _partial_sums(self, limbs: torch.Tensor) -> torch.Tensor:
        """`(m, in)` int8 share limbs -> `(m, 2·out)` exact partial sums (int32, or float64 holding integers)."""
        if self.use_int_mm:
            return torch._int_mm(limbs, self._limbs.T)
        return limbs.to(torch.float64) @ self._limbs.T.to(torch.float64)  # |sum| <= 2^14 · in < 2^53: exact

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Exact `x @ w_int.T mod 2^64` for an `(n, in)` int64 share; the result is on this weight's device.

        Raises:
            `ValueError`: `x` is not `(n, in_features)`.
        """
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected an (n, {self.in_features}) share, got shape {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.int64)
        n = x.shape[0]
        y = torch.empty(n, self.out_features, dtype=torch.int64, device=self.device)
        per_row = N_SHARE_LIMBS * 2 * self._out_padded * 4
        chunk = max(1, _CHUNK_BYTES // per_row)
        for start in range(0, n, chunk):
            y[start : start + chunk] = self._matmul_rows(x[start : start + chunk])
        return y

    def _matmul_rows(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows = -(-_CUDA_MIN_ROWS // N_SHARE_LIMBS) if self.pad and n * N_SHARE_LIMBS < _CUDA_MIN_ROWS else n
        padded = F.pad(x, (0, self._in_padded - self.in_features, 0, rows - n))  # zero shares: zero limbs
        limbs = share_byte_limbs(padded).view(N_SHARE_LIMBS * rows, self._in_padded)
        partial = self._partial_sums(limbs).view(N_SHARE_LIMBS, rows, 2, self._out_padded)
        partial = partial[:, :n, :, : self.out_features]
        y = torch.zeros(n, self.out_features, dtype=torch.int64, device=x.device)
        for k in reversed(range(N_SHARE_LIMBS)):  # Horner in 2^8: y = sum_k 2^(8k) (B_k lo + 256 B_k hi)
            y <<= 8  # wraps mod 2^64
            y += partial[k, :, 0].to(torch.int64)
            y += partial[k, :, 1].to(torch.int64) << 8
        y += torch.sum(x, dim=1, dtype=torch.int64, keepdim=True) << 7  # the 128 taken out of every weight
        return y


def int8_held_bytes(out_features: int, in_features: int, device: str | torch.device = "cpu") -> int:
    """Bytes an [`Int8RingWeight`] of this shape holds on `device` (for placement before loading)."""
    pad = torch.device(device).type == "cuda"
    align = _CUDA_ALIGN if pad else 1
    return 2 * _round_up(max(out_features, 1), align // 2 or 1) * _inner_padded(in_features, align)
