"""The ring Z_2^64 and additive sharing (DESIGN.md §4): pure math, no network, no model.

* `fixed_point`: [`RingConfig`], encoding activations and decoding reconstructed products, weight quantisation.
* `matmul`: the servers' exact ring product ([`RingWeight`]: native SIMD kernel or float64 limbs).
* `limbs`: exact products through float64 GEMMs on limbs (the float64 kernel and the client's verifier).
* `native`: building and loading `ring_kernel.c`.
* `csprng`: the ChaCha20 keystream every mask and secret comes from.
* `sharing`: splitting an encoded input into two shares, expanding party A's share from its seed.
"""

from .fixed_point import RingConfig, decode_activation, decode_output, encode, quantize_weight
from .matmul import RingWeight, ring_matmul_reference

__all__ = [
    "RingConfig",
    "RingWeight",
    "decode_activation",
    "decode_output",
    "encode",
    "quantize_weight",
    "ring_matmul_reference",
]
