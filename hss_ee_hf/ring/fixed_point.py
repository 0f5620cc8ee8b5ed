"""Fixed-point encoding and exact arithmetic over the ring Z_2^64 (DESIGN.md §4).

The ring lives in `torch.int64`: two's-complement wrap-around is reduction mod 2^64.
Activations are encoded as `round(x * 2^f)`; weights as symmetric per-output-channel integers
`W_int = round(W / s)` with public scales `s`. A server computes `x_i @ W_int.T mod 2^64` on its
share `x_i`; the client adds the two output shares and decodes with `s * 2^-f`.

The ring products themselves are in [`hss_ee_hf.ring.matmul`].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import InvalidConfigError, RingOverflowError

# A legitimate ring product stays below 2^OUTPUT_BITS in magnitude: |x_int| < 2^(f + h),
# |w_int| < 2^(weight_bits - 1) and in_features <= 2^k give 2^(f + h + weight_bits - 1 + k) <= 2^62.
# The activation headroom h is what is left for a stage's width, at most MAX_HEADROOM_BITS.
OUTPUT_BITS = 62
MAX_HEADROOM_BITS = 24
QUANTIZE_BLOCK_ROWS = 4096


@dataclass(frozen=True)
class RingConfig:
    """Ring parameters shared by the client, the servers and the checkpoint's `hss_ee` block.

    Args:
        frac_bits (`int`, *optional*, defaults to 16): fractional bits `f` of the activation encoding.
        weight_bits (`int`, *optional*, defaults to 16): bits of the symmetric integer weights.
    """

    frac_bits: int = 16
    weight_bits: int = 16

    def __post_init__(self):
        if not 1 <= self.frac_bits <= 24:
            raise InvalidConfigError(f"frac_bits must be in [1, 24], got {self.frac_bits}")
        if not 2 <= self.weight_bits <= 16:
            raise InvalidConfigError(f"weight_bits must be in [2, 16], got {self.weight_bits}")

    @property
    def weight_max(self) -> int:
        """Largest integer weight magnitude, `2^(weight_bits - 1) - 1`."""
        return (1 << (self.weight_bits - 1)) - 1

    def headroom_bits(self, in_features: int) -> int:
        """Integer bits `h` left for activations of a stage with `in_features` inputs (|x| < 2^h)."""
        width_bits = max(in_features - 1, 1).bit_length()
        h = min(MAX_HEADROOM_BITS, OUTPUT_BITS - (self.weight_bits - 1) - width_bits - self.frac_bits)
        if h < 1:
            raise RingOverflowError(
                f"a stage with {in_features} inputs leaves no headroom with frac_bits={self.frac_bits} and "
                f"weight_bits={self.weight_bits}; lower frac_bits"
            )
        return h

    def activation_limit(self, in_features: int) -> float:
        """Largest real activation magnitude (exclusive) a stage with `in_features` inputs can encode."""
        return float(1 << self.headroom_bits(in_features))

    def output_limit(self, in_features: int) -> int:
        """Largest magnitude a legitimate ring product with `in_features` inputs can have (< 2^62)."""
        return in_features * self.weight_max * (1 << (self.frac_bits + self.headroom_bits(in_features)))

    def to_dict(self) -> dict:
        return asdict(self)


def encode(x: torch.Tensor, config: RingConfig, in_features: int | None = None) -> torch.Tensor:
    """Encodes real values as fixed-point ring elements `round(x * 2^f)`.

    Args:
        x (`torch.Tensor`): floating-point activations.
        config (`RingConfig`): ring parameters.
        in_features (`int`, *optional*): width of the stage the values feed (defaults to `x.shape[-1]`);
            it sets how large they may be.

    Returns:
        `torch.Tensor` of dtype `int64` and the same shape.

    Raises:
        `RingOverflowError`: a value is not finite or its magnitude reaches `config.activation_limit`.
    """
    x = x.detach().to(torch.float64)
    if in_features is None and x.dim() == 0:
        raise ValueError("encode needs in_features for a 0-d tensor (the stage width bounds the values)")
    limit = config.activation_limit(in_features or x.shape[-1])
    peak = x.abs().max().item() if x.numel() else 0.0
    if not peak < limit:  # also true for NaN
        raise RingOverflowError(
            f"activation magnitude {peak:.4g} is outside the fixed-point range (< {limit:g}); "
            "the model produced non-finite or exploding activations for this input"
        )
    return torch.round(x * (1 << config.frac_bits)).to(torch.int64)


def decode_activation(x_int: torch.Tensor, config: RingConfig) -> torch.Tensor:
    """Inverse of [`encode`]: `x_int * 2^-f` as float64."""
    return x_int.to(torch.float64) / (1 << config.frac_bits)


def decode_output(y_int: torch.Tensor, scale: torch.Tensor, in_features: int, config: RingConfig) -> torch.Tensor:
    """Decodes a reconstructed ring product into real outputs `y_int * s * 2^-f`.

    Args:
        y_int (`torch.Tensor`): `(..., out)` reconstructed ring product (`int64`).
        scale (`torch.Tensor`): `(out,)` public per-output-channel weight scales.
        in_features (`int`): inner dimension of the product, which bounds legitimate values.
        config (`RingConfig`): ring parameters.

    Returns:
        `torch.Tensor` of dtype float64.

    Raises:
        `RingOverflowError`: a value is outside the overflow budget, which happens when a share was
            corrupted or does not belong to this request.
    """
    limit = config.output_limit(in_features)
    if y_int.numel():
        low, high = (v.item() for v in torch.aminmax(y_int))  # one pass; no abs(), which INT64_MIN defeats
        if high > limit:
            raise RingOverflowError(
                f"reconstructed value outside the overflow budget (|y| <= {limit}); a share is corrupted "
                "or the two servers answered different requests"
            )
        if low < -limit:
            raise RingOverflowError(f"reconstructed value below the overflow budget (-{limit}); a share is corrupted")
    # scaling the (out,) scales by 2^-f is exact, so this equals (y * s) * 2^-f with one pass over y fewer
    return y_int.to(torch.float64) * (scale.to(torch.float64) / (1 << config.frac_bits))


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}
# The ufuncs' own reductions: `ndarray.min()` adds a Python-level wrapper, a microsecond per call on the hot path.
_min, _max = np.minimum.reduce, np.maximum.reduce


class StageCodec:
    """[`encode`] and [`decode_output`] for one stage, with its limits and scales worked out once.

    The client's online path runs these on every stage call; on CPU float32/float64 they run as a few NumPy passes
    over the row instead of a dozen torch dispatches, and give the same results bit for bit (scaling by `2^f` and
    rounding half to even are exact in either precision; the decoded values are the same float64 products, cast
    once). Anything else (other dtypes, other devices) goes through [`encode`] / [`decode_output`].

    Args:
        config (`RingConfig`): ring parameters.
        in_features (`int`): the stage's input width (bounds inputs and legitimate products).
        scale (`torch.Tensor`): `(out,)` public per-output-channel weight scales.
    """

    def __init__(self, config: RingConfig, in_features: int, scale: torch.Tensor):
        self.config, self.in_features = config, in_features
        self.scale = scale.to(torch.float64)
        self.out_features = self.scale.numel()
        self.in_limit = config.activation_limit(in_features)
        self.out_limit = config.output_limit(in_features)
        self._frac = float(1 << config.frac_bits)
        self._scale = (self.scale / (1 << config.frac_bits)).numpy()  # exact: a power of two

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`(rows, in_features)` activations -> `int64` ring elements, as [`encode`].

        Raises:
            `RingOverflowError`: a value is not finite or outside the fixed-point range.
        """
        if not x.is_cpu or x.dtype not in _NUMPY_FLOATS or x.requires_grad:
            return encode(x, self.config, self.in_features)
        v = x.numpy()
        if v.size and not (_max(v, None) < self.in_limit and -self.in_limit < _min(v, None)):  # also true for NaN
            peak = float(np.abs(v).max())
            raise RingOverflowError(
                f"activation magnitude {peak:.4g} is outside the fixed-point range (< {self.in_limit:g}); "
                "the model produced non-finite or exploding activations for this input"
            )
        scaled = v * self._frac  # exact: a power of two
        return torch.from_numpy(np.rint(scaled, out=scaled).astype(np.int64))

    def decode(self, y_a: torch.Tensor, y_b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Adds two output shares (mod 2^64) and decodes them to `dtype`, as [`decode_output`] then `.to(dtype)`.

        Raises:
            `RingOverflowError`: the sum is outside the overflow budget (a corrupted or mismatched share).
        """
        if not (y_a.is_cpu and y_b.is_cpu) or dtype not in _NUMPY_FLOATS:
            return decode_output(y_a + y_b, self.scale, self.in_features, self.config).to(dtype)
        y = np.add(y_a.numpy(), y_b.numpy())  # int64 arrays wrap, as the ring requires
        if y.size:
            if _max(y, None) > self.out_limit:
                raise RingOverflowError(
                    f"reconstructed value outside the overflow budget (|y| <= {self.out_limit}); a share is "
                    "corrupted or the two servers answered different requests"
                )
            if _min(y, None) < -self.out_limit:
                raise RingOverflowError(
                    f"reconstructed value below the overflow budget (-{self.out_limit}); a share is corrupted"
                )
        out = np.multiply(y, self._scale)  # int64 -> float64, then the product: decode_output's arithmetic
        return torch.from_numpy(out if dtype == torch.float64 else out.astype(_NUMPY_FLOATS[dtype]))


def quantize_weight(weight: torch.Tensor, config: RingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel integer quantisation of a `(out, in)` weight.

    Returns:
        `(w_int, scale)`: `int64` integers with `|w_int| <= config.weight_max` and the float64
        `(out,)` scales `s = max|W_row| / weight_max` (1 for all-zero rows).
    """
    weight = weight.detach()
    w_int = torch.empty(weight.shape, dtype=torch.int64)
    scale = torch.empty(weight.shape[0], dtype=torch.float64)
    for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):  # blocks bound the float64 temporaries
        w = weight[start : start + QUANTIZE_BLOCK_ROWS].to(torch.float64)
        peak = w.abs().amax(dim=1)
        s = torch.where(peak > 0, peak / config.weight_max, torch.ones_like(peak))
        w_int[start : start + w.shape[0]] = torch.round(w / s.unsqueeze(1)).clamp_(
            -config.weight_max, config.weight_max
        )
        scale[start : start + w.shape[0]] = s
    return w_int, scale
