"""The int8 ring kernel (`hss_ee_hf.ring.int8`): exact against the big-integer and int64 references, on CPU.

The CUDA servers run this code with CUDA tensors; here the same functions run with CPU tensors, through
`torch._int_mm` and through the float64 fallback over the same limbs, with and without CUDA's shape padding. So
CI proves the GPU's arithmetic without a GPU: the byte decompositions, the int32 bound, the recombination mod 2^64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.int8 import (
    MAX_IN_FEATURES_INT8,
    Int8RingWeight,
    int8_held_bytes,
    int_mm_works,
    share_byte_limbs,
    weight_byte_limbs,
)
from hss_ee_hf.ring.matmul import RingWeight, held_bytes, ring_matmul_reference
from hss_ee_hf.server.engine import StageEngine

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
W_MAX = (1 << 15) - 1
# (pad, use_int_mm): CPU as it runs, CUDA's padded shapes, and the float64 fallback of both.
PATHS = [(False, True), (True, True), (False, False), (True, False)]


def signed64(v: int) -> int:
    """Reduces a Python integer mod 2^64 and reads it as two's-complement int64."""
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


def bigint_matmul(x: list[list[int]], w: list[list[int]]) -> list[list[int]]:
    """`x @ w.T mod 2^64` in unbounded Python integers, read back as signed int64."""
    return [[signed64(sum(a * b for a, b in zip(row, wrow, strict=True))) for wrow in w] for row in x]


int64_values = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MAX, -1, 0, 1, INT64_MIN + 1, INT64_MAX - 1, 0x7F7F7F7F7F7F7F7F]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)
weight_values = st.one_of(
    st.sampled_from([-W_MAX, W_MAX, -(1 << 15), -1, 0, 1, 127, 128, -128, -129, 255, 256]),
    st.integers(min_value=-(1 << 15), max_value=W_MAX),
)


@st.composite
def ring_problem(draw):
    rows = draw(st.integers(1, 5))
    in_features = draw(st.integers(1, 40))
    out_features = draw(st.integers(1, 12))
    x = draw(st.lists(int64_values, min_size=rows * in_features, max_size=rows * in_features))
    w = draw(st.lists(weight_values, min_size=out_features * in_features, max_size=out_features * in_features))
    return (
        [x[r * in_features : (r + 1) * in_features] for r in range(rows)],
        [w[o * in_features : (o + 1) * in_features] for o in range(out_features)],
    )


@settings(max_examples=80, deadline=None)
@given(ring_problem())
def test_int8_kernel_matches_bigint_reference(problem):
    x, w = problem
    expected = bigint_matmul(x, w)
    xt, wt = torch.tensor(x, dtype=torch.int64), torch.tensor(w, dtype=torch.int64)
    for pad, use_int_mm in PATHS:
        got = Int8RingWeight(wt, pad=pad, use_int_mm=use_int_mm).matmul(xt).tolist()
        assert got == expected, (pad, use_int_mm)
    if wt.abs().max() < 1 << 15:  # RingWeight keeps the other kernels' |w| < 2^15; -2^15 is the int8 kernel's own
        assert RingWeight(wt, kernel="int8").matmul(xt).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(int64_values, min_size=1, max_size=16))
def test_share_limbs_are_signed_bytes_that_sum_back(values):
    limbs = share_byte_limbs(torch.tensor([values], dtype=torch.int64))  # (8, 1, n)
    assert limbs.dtype == torch.int8 and limbs.shape == (8, 1, len(values))
    for j, v in enumerate(values):
        assert signed64(sum(int(limbs[k, 0, j]) << (8 * k) for k in range(8))) == v


def test_weight_limbs_cover_the_whole_16_bit_range():
    w = torch.arange(-(1 << 15), 1 << 15).view(1, -1)
    limbs = weight_byte_limbs(w).to(torch.int64)  # int8 by construction: every limb in [-128, 127]
    assert torch.equal(256 * limbs[1] + limbs[0], w[0] - 128)
    with pytest.raises(ValueError, match=r"\[-32768, 32767\]"):
        weight_byte_limbs(torch.tensor([[1 << 15]]))


def extreme_problem(
    rows: int, in_features: int, out_features: int, seed: int, w_min: int = -W_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform shares and weights with rows pinned at the ends of both ranges (`w_min`: the lowest weight)."""
    rng = ChaChaStream(seed.to_bytes(4, "little") * 8)
    x = rng.int64((rows, in_features))
    for r, v in zip(range(rows), (INT64_MIN, INT64_MAX, -1), strict=False):
        x[r] = v
    w = torch.remainder(rng.int64((out_features, in_features)), 2 * W_MAX + 1) - W_MAX
    for o, v in zip(range(out_features), (W_MAX, -W_MAX, w_min), strict=False):
        w[o] = v
    return x, w


@pytest.mark.parametrize(
    "rows,in_features,out_features",
    [
        (1, 1, 1),  # CPU _int_mm is broken at inner size 1: the kernel pads it
        (1, 7, 3),  # one row: CUDA's > 16 rows needs row padding; in and 2·out not multiples of 8
        (2, 9, 5),
        (3, 576, 17),
        (1, 4097, 11),  # odd in_features at a 7B-like width
        (130, 24, 8),  # several row chunks (see the monkeypatched chunk size below)
    ],
)
@pytest.mark.parametrize("pad,use_int_mm", PATHS)
def test_extremes_and_odd_shapes_match_int64_reference(rows, in_features, out_features, pad, use_int_mm, monkeypatch):
    from hss_ee_hf.ring import int8

    monkeypatch.setattr(int8, "_CHUNK_BYTES", 1 << 12)  # forces chunking of the rows, as a long prefill would
    x, w = extreme_problem(rows, in_features, out_features, seed=rows * 7 + in_features, w_min=-(1 << 15))
    weight = Int8RingWeight(w, pad=pad, use_int_mm=use_int_mm)
    assert torch.equal(weight.matmul(x), ring_matmul_reference(x, w))


@pytest.mark.parametrize("in_features", [MAX_IN_FEATURES_INT8])
@pytest.mark.parametrize("pad", [False, True])
def test_exact_at_the_int32_bound(in_features, pad):
    """Every limb at -128 on both sides makes each int32 partial sum 2^14 · in, 2^31 - 2^14 at the bound."""
    x = torch.full((1, in_features), 0x7F7F7F7F7F7F7F80, dtype=torch.int64)  # x + C = 0 mod 2^64: every b_k = -128
    assert bool((share_byte_limbs(x) == -128).all())
    w = torch.full((2, in_features), -(1 << 15), dtype=torch.int64)  # lo = hi = -128
    assert bool((weight_byte_limbs(w) == -128).all())
    weight = Int8RingWeight(w, pad=pad, use_int_mm=True)
    assert torch.equal(weight.matmul(x), ring_matmul_reference(x, w))
    assert torch.equal(weight.matmul(x), torch.tensor([bigint_matmul(x.tolist(), w[:1].tolist())[0] * 2]))
    with pytest.raises(ValueError, match="exactness bound"):
        Int8RingWeight(torch.zeros(1, in_features + 1, dtype=torch.int64))


def test_int_mm_probe_and_two_bytes_per_weight():
    assert int_mm_works(torch.device("cpu"))  # torch's CPU _int_mm is exact: CI runs the _int_mm path
    w = extreme_problem(1, 576, 1536, seed=3)[1]
    weight = RingWeight(w, kernel="int8")
    assert weight.kernel == "int8" and weight.nbytes == 2 * w.numel()
    assert held_bytes(1536, 576, "int8") == weight.nbytes
    assert int8_held_bytes(5, 9, "cuda") == 2 * 8 * 16  # out padded to 8, in to 16 for CUDA's _int_mm
    assert held_bytes(1536, 576, "float64") == 8 * w.numel()


def test_shape_mismatch_is_refused():
    weight = Int8RingWeight(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        weight.matmul(torch.ones(2, 5, dtype=torch.int64))


def test_auto_picks_int8_only_on_cuda(monkeypatch):
    monkeypatch.setenv("HSS_EE_KERNEL", "float64")
    assert RingWeight(torch.ones(2, 3, dtype=torch.int64)).kernel == "float64"  # CPU behaviour unchanged
    monkeypatch.setenv("HSS_EE_KERNEL", "int8")
    assert RingWeight(torch.ones(2, 3, dtype=torch.int64)).kernel == "int8"


def test_engines_with_int8_and_float64_return_identical_bytes(tiny_ee_checkpoint):
    int8_engine = StageEngine(tiny_ee_checkpoint, kernel="int8")
    float_engine = StageEngine(tiny_ee_checkpoint, kernel="float64")
    assert (int8_engine.kernel, float_engine.kernel) == ("int8", "float64")
    held = sum(w.nbytes for w in int8_engine.weights.values())
    assert held == 2 * sum(w.in_features * w.out_features for w in int8_engine.weights.values())
    rng = ChaChaStream(b"\x07" * 32)
    fp = int8_engine.fingerprint
    for stage, (in_features, _) in int8_engine.describe().items():
        for rows in (1, 3):
            share = rng.bytes(rows * in_features * 8)
            assert int8_engine.compute(fp, stage, rows, share=share) == float_engine.compute(
                fp, stage, rows, share=share
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "rows,in_features,out_features", [(1, 4096, 12288), (2, 11008, 4096), (3, 7, 5), (512, 4096, 77)]
)
def test_cuda_int8_kernel_is_exact_and_uses_tensor_cores(rows, in_features, out_features):
    """On a GPU: `_int_mm` is taken (not the fallback) and every product equals the CPU int64 reference."""
    assert int_mm_works(torch.device("cuda"))
    x, w = extreme_problem(rows, in_features, out_features, seed=rows + out_features)
    weight = RingWeight(w, device="cuda")
    assert weight.kernel == "int8" and weight.nbytes <= 2 * (out_features + 4) * (in_features + 8)
    assert torch.equal(weight.matmul(x).cpu(), ring_matmul_reference(x, w))
