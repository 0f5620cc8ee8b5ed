"""The servers' exact ring product `x @ W_int.T mod 2^64` (DESIGN.md §4).

Four kernels compute it:

* [`ring_matmul_reference`]: plain `int64` matrix product (the definition).
* The native kernel ([`hss_ee_hf.ring.native`], used by [`RingWeight`] on CPU when a C compiler is
  present): the weight is held as 2-byte integers and multiplied into the 64-bit shares (AVX-512 VNNI,
  AVX2 or scalar C), wrapping mod 2^64 (`ring_kernel.c` explains why that is exact). It reads a quarter of the bytes
  of the float64 kernel, which is what a memory-bound decode step pays for.
* The float64 kernel (CUDA, or CPU without a compiler): each 64-bit share is split into three
  unsigned 22-bit limbs ([`hss_ee_hf.ring.limbs`]) multiplied with the weight held once as float64. Every
  partial sum is an integer of magnitude below `2^22 * 2^15 * in_features <= 2^53` (in_features < 2^16), so
  float64 accumulates it exactly in any order, and the limbs are recombined with wrapping `int64` shifts.

* The int8 kernel ([`hss_ee_hf.ring.int8`], the default on CUDA, selectable anywhere): the weight held once as two
  signed byte limbs (2 bytes per weight), the share as eight, multiplied with `torch._int_mm` on int8 tensor cores
  with exact int32 partial sums (`2^14 · in < 2^31`), recombined with wrapping shifts.

Tests prove every fast kernel equal to the reference, extreme values included.
"""

from __future__ import annotations

import torch

from .int8 import Int8RingWeight, int8_held_bytes
from .limbs import recombine, to_limbs
from .native import kernel_choice, load_native_kernel

LIMB_BITS = 22  # 3 limbs cover bits 0..65; bits from 64 up vanish after the shift
MAX_IN_FEATURES = 1 << 15


def ring_matmul_reference(x: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """The definition of the server's work: `x @ w_int.T mod 2^64` in plain `int64`."""
    return x @ w_int.T


class RingWeight:
    """An integer weight held once in the form the fast exact kernel reads.

    With the int8 kernel (`kernel="int8"`, or `"auto"` on CUDA) it keeps the weight as two int8 limbs; on CPU with
    the native kernel available as 2-byte offset integers `w + 2^15`; otherwise (no compiler, `kernel="float64"`, or
    `"native"` asked for on CUDA) as a transposed float64 matrix.

    Args:
        w_int (`torch.Tensor`): `(out, in)` integer weight with `|w| < 2^15`.
        device (`str` or `torch.device`, *optional*): where to keep it.
        kernel (`str`, *optional*): `"auto"`, `"native"`, `"float64"` or `"int8"`; defaults to `$HSS_EE_KERNEL` or
            `"auto"`: int8 on CUDA, native on CPU when it builds, else float64.
    """

    def __init__(self, w_int: torch.Tensor, device: str | torch.device = "cpu", kernel: str | None = None):
        if w_int.dim() != 2:
            raise ValueError(f"a ring weight must be 2-D (out, in), got shape {tuple(w_int.shape)}")
        if w_int.shape[1] >= MAX_IN_FEATURES:
            raise ValueError(f"in_features {w_int.shape[1]} exceeds the exactness bound {MAX_IN_FEATURES}")
        if w_int.numel() and w_int.abs().max().item() >= 1 << 15:
            raise ValueError("ring weights must be below 2^15 in magnitude for the fast kernels to be exact")
        self.out_features, self.in_features = w_int.shape
        device = torch.device(device)
        choice = kernel_choice(kernel)
        self._int8 = None
        self._native = None
        if choice == "int8" or (choice == "auto" and device.type == "cuda"):
            self._int8 = Int8RingWeight(w_int, device=device)
            self._device = self._int8.device
        elif device.type == "cpu" and (native := load_native_kernel(choice)) is not None:
            self._native = native
            # The C kernel reads u = w + 2^15 in [1, 2^16 - 1] as uint16: flipping the sign bit of w's int16 bits
            # adds 2^15 mod 2^16, so the int16 tensor holds exactly those bits.
            self._u = (w_int.to(torch.int16) ^ -(1 << 15)).contiguous()
            self._device = device
        else:
            self._w_t = w_int.to(device=device, dtype=torch.float64).T.contiguous()  # (in, out)
            self._device = self._w_t.device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def kernel(self) -> str:
        """`"int8"`, `"native"` or `"float64"`: the kernel this weight is held for."""
        if self._int8 is not None:
            return "int8"
        return "native" if self._native is not None else "float64"

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per product (the weight as held): 2 per weight for int8 and native, 8 for float64."""
        if self._int8 is not None:
            return self._int8.nbytes
        held = self._u if self._native is not None else self._w_t
        return held.numel() * held.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Exact `x @ w_int.T mod 2^64` for an `(n, in)` int64 share."""
        if self._int8 is not None:
            return self._int8.matmul(x)
        if self._native is not None:
            return self._native.matmul(x.to(torch.int64), self._u)
        limbs = to_limbs(x.to(self._w_t.device), LIMB_BITS)  # (3, n, in)
        return recombine(limbs @ self._w_t, LIMB_BITS)  # every partial sum < 2^53: exact


def held_bytes(out_features: int, in_features: int, kernel: str, device: str | torch.device = "cpu") -> int:
    """Bytes a [`RingWeight`] of this shape holds with `kernel` (`"int8"`, `"native"` or `"float64"`) on `device`.

    Lets a server place stages on devices from the checkpoint's shapes before it loads a single weight.
    """
    if kernel == "int8":
        return int8_held_bytes(out_features, in_features, device)
    return out_features * in_features * (2 if kernel == "native" else 8)


class RingBlocks:
    """Several ring weights over leading input columns, outputs concatenated: a fused stage (two-stage schedule).

    Block `k` multiplies the first `cols_k` input columns by its own weight, so a fused stage holds no zero blocks
    and each block keeps its own quantisation scales. Same interface as [`RingWeight`].

    Args:
        blocks (`list[tuple[int, RingWeight]]`): `(cols, weight)` with `weight.in_features == cols`; the widest
            block sets `in_features`.
    """

    def __init__(self, blocks: list[tuple[int, RingWeight]]):
        if not blocks or any(w.in_features != cols for cols, w in blocks):
            raise ValueError("every block needs a weight whose in_features equals its column count")
        self.blocks = blocks
        self.in_features = max(cols for cols, _ in blocks)
        self.out_features = sum(w.out_features for _, w in blocks)

    @property
    def device(self) -> torch.device:
        return self.blocks[0][1].device

    @property
    def kernel(self) -> str:
        return self.blocks[0][1].kernel

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for _, w in self.blocks)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Exact `[x[:, :c1] @ w1.T, x[:, :c2] @ w2.T, ...] mod 2^64` for an `(n, in)` int64 share."""
        outs = [w.matmul(x if cols == x.shape[1] else x[:, :cols].contiguous()) for cols, w in self.blocks]
        return torch.cat(outs, dim=1)
