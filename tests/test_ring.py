"""Exactness of the ring kernels and the fixed-point encoding (DESIGN.md §4).

Every ring product is compared with a pure-Python big-integer reference `sum(x * w) mod 2^64`,
so the tests do not trust `int64` wrap-around either.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hss_ee_hf.errors import RingOverflowError
from hss_ee_hf.ring.csprng import ChaChaStream
from hss_ee_hf.ring.fixed_point import RingConfig, decode_activation, decode_output, encode, quantize_weight
from hss_ee_hf.ring.matmul import MAX_IN_FEATURES, RingWeight, ring_matmul_reference
from hss_ee_hf.ring.sharing import reconstruct, share

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
W_MAX = (1 << 15) - 1
# the native kernel is tested wherever a C compiler exists (CI has gcc); "native" fails loudly if it cannot build
KERNELS = ["float64", "native"] if shutil.which("cc") or shutil.which("gcc") else ["float64"]

int64_values = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MAX, -1, 0, 1, INT64_MIN + 1, INT64_MAX - 1]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)
weight_values = st.one_of(
    st.sampled_from([-W_MAX, W_MAX, -1, 0, 1]),
    st.integers(min_value=-W_MAX, max_value=W_MAX),
)


def signed64(v: int) -> int:
    """Reduces a Python integer mod 2^64 and reads it as two's-complement int64."""
    return ((v + (1 << 63)) % (1 << 64)) - (1 << 63)


def bigint_matmul(x: list[list[int]], w: list[list[int]]) -> list[list[int]]:
    """`x @ w.T mod 2^64` in unbounded Python integers, read back as signed int64."""
    return [[signed64(sum(a * b for a, b in zip(row, wrow, strict=True))) for wrow in w] for row in x]


@st.composite
def ring_problem(draw):
    rows = draw(st.integers(1, 4))
    in_features = draw(st.integers(1, 64))
    out_features = draw(st.integers(1, 16))
    x = draw(st.lists(int64_values, min_size=rows * in_features, max_size=rows * in_features))
    w = draw(st.lists(weight_values, min_size=out_features * in_features, max_size=out_features * in_features))
    return (
        [x[r * in_features : (r + 1) * in_features] for r in range(rows)],
        [w[o * in_features : (o + 1) * in_features] for o in range(out_features)],
    )


@settings(max_examples=80, deadline=None)
@given(ring_problem())
def test_ring_matmul_matches_bigint_reference(problem):
    x, w = problem
    expected = bigint_matmul(x, w)
    xt = torch.tensor(x, dtype=torch.int64)
    wt = torch.tensor(w, dtype=torch.int64)
    assert ring_matmul_reference(xt, wt).tolist() == expected
    for kernel in KERNELS:
        assert RingWeight(wt, kernel=kernel).matmul(xt).tolist() == expected, kernel


@pytest.mark.parametrize("in_features", [4096, MAX_IN_FEATURES - 1])
def test_limb_kernel_exact_at_large_in_features(in_features):
    # -1 has every 16-bit limb at 0xFFFF, the largest partial sums the float64 kernel can see.
    rng = ChaChaStream(bytes(range(32)))
    x = torch.stack(
        [
            torch.full((in_features,), -1, dtype=torch.int64),
            torch.full((in_features,), INT64_MIN, dtype=torch.int64),
            torch.full((in_features,), INT64_MAX, dtype=torch.int64),
            rng.int64((in_features,)),
        ]
    )
    signs = torch.where(rng.int64((in_features,)) >= 0, 1, -1)
    w = torch.stack(
        [
            torch.full((in_features,), W_MAX, dtype=torch.int64),
            torch.full((in_features,), -W_MAX, dtype=torch.int64),
            signs * W_MAX,
        ]
    )
    expected = bigint_matmul(x.tolist(), w.tolist())
    for kernel in KERNELS:
        assert RingWeight(w, kernel=kernel).matmul(x).tolist() == expected, kernel
    assert ring_matmul_reference(x, w).tolist() == expected


def test_ring_weight_refuses_inputs_outside_exactness_bound():
    with pytest.raises(ValueError, match="in_features"):
        RingWeight(torch.zeros(1, MAX_IN_FEATURES, dtype=torch.int64))
    with pytest.raises(ValueError, match="2\\^15"):
        RingWeight(torch.tensor([[1 << 15]], dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        RingWeight(torch.zeros(3, dtype=torch.int64))


WIDTHS = [1, 2, 3, 64, 96, 576, 1536, 4096, MAX_IN_FEATURES - 1]


def test_overflow_budget_fits_the_ring():
    # every accepted config: a legitimate product (|x_int| <= 2^(f+h), |w| <= weight_max) stays below 2^62,
    # so it never wraps and decode_output can tell it from a garbage share
    for frac_bits in range(1, 25):
        for weight_bits in range(2, 17):
            config = RingConfig(frac_bits=frac_bits, weight_bits=weight_bits)
            for n in WIDTHS:
                h = config.headroom_bits(n)
                assert 1 <= h
                assert config.activation_limit(n) == 2.0**h
                limit = config.output_limit(n)
                assert limit == n * config.weight_max * 2 ** (frac_bits + h)
                assert limit < 1 << 62, (frac_bits, weight_bits, n)


def test_default_config_keeps_design_headroom():
    # DESIGN.md §4: with f = 16 and 16-bit weights, activations up to |x| < 2^11 always fit
    config = RingConfig()
    for n in WIDTHS:
        assert config.activation_limit(n) >= 2048.0


def test_headroom_refuses_impossible_widths():
    with pytest.raises(RingOverflowError, match="headroom"):
        RingConfig(frac_bits=24).headroom_bits(1 << 24)


@pytest.mark.parametrize("config", [RingConfig(), RingConfig(frac_bits=24), RingConfig(frac_bits=8, weight_bits=8)])
@pytest.mark.parametrize("in_features", [1, 64, MAX_IN_FEATURES - 1])
def test_worst_case_legit_product_is_exact_and_decodes(config, in_features):
    # the largest activations encode() accepts times the largest weights: the kernel is exact (big-int
    # reference) and decode_output accepts the result
    x_real = math.nextafter(config.activation_limit(in_features), 0.0)
    x = torch.full((2, in_features), x_real, dtype=torch.float64)
    x[1] = -x_real
    x_int = encode(x, config, in_features)
    w_int = torch.full((3, in_features), config.weight_max, dtype=torch.int64)
    w_int[1] = -config.weight_max
    w_int[2, ::2] = -config.weight_max
    y = RingWeight(w_int, kernel="float64").matmul(x_int)
    assert y.tolist() == bigint_matmul(x_int.tolist(), w_int.tolist())
    for kernel in KERNELS:
        assert torch.equal(RingWeight(w_int, kernel=kernel).matmul(x_int), y), kernel
    out = decode_output(y, torch.ones(3, dtype=torch.float64), in_features, config)
    expected = x @ w_int.to(torch.float64).T
    assert (out - expected).abs().max().item() <= in_features * config.weight_max * 2.0 ** -(config.frac_bits + 1)


# -- fixed-point encoding --------------------------------------------------------------------------


@pytest.mark.parametrize("frac_bits", [16, 8, 24])
@pytest.mark.parametrize("in_features", [64, 4096])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_encode_decode_round_trip(frac_bits, in_features, data):
    config = RingConfig(frac_bits=frac_bits)
    limit = config.activation_limit(in_features)
    values = data.draw(
        st.lists(
            st.one_of(
                st.sampled_from([0.0, -0.0, 2.0**-frac_bits, math.nextafter(limit, 0.0), -math.nextafter(limit, 0.0)]),
                st.floats(min_value=-limit, max_value=limit, allow_nan=False, exclude_min=True, exclude_max=True),
            ),
            min_size=1,
            max_size=32,
        )
    )
    x = torch.tensor(values, dtype=torch.float64)
    x_int = encode(x, config, in_features)
    assert x_int.dtype == torch.int64
    # round() is off by at most half a unit in the last fractional place (scaling by 2^f is exact in float64)
    err = (decode_activation(x_int, config) - x).abs().max().item()
    assert err <= 2.0 ** -(frac_bits + 1)


@pytest.mark.parametrize("frac_bits", [16, 12])
@pytest.mark.parametrize("in_features", [64, 4096])
@pytest.mark.parametrize("bad", ["limit", "-limit", "1.5limit", 1e30, float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_values_outside_range(frac_bits, in_features, bad):
    config = RingConfig(frac_bits=frac_bits)
    limit = config.activation_limit(in_features)
    value = {"limit": limit, "-limit": -limit, "1.5limit": 1.5 * limit}.get(bad, bad)
    x = torch.tensor([0.5, -3.0, value, 1.0], dtype=torch.float64)
    with pytest.raises(RingOverflowError, match="fixed-point range"):
        encode(x, config, in_features)


def test_encode_limit_follows_the_stage_width():
    config = RingConfig()
    narrow, wide = config.activation_limit(64), config.activation_limit(4096)
    assert narrow > wide
    x = torch.full((1, 64), (narrow + wide) / 2, dtype=torch.float64)
    encode(x, config)  # in_features defaults to the last dimension (64)
    with pytest.raises(RingOverflowError):
        encode(x, config, in_features=4096)


def test_encode_accepts_just_below_limit():
    config = RingConfig()
    limit = config.activation_limit(4096)
    below = math.nextafter(limit, 0.0)
    x_int = encode(torch.tensor([below, -below], dtype=torch.float64), config, 4096)
    # round() may land on 2^(f+h) itself; output_limit budgets |x_int| <= 2^(f+h), so that is still legit
    assert x_int.abs().max().item() <= limit * 2**config.frac_bits


# -- decoding the reconstructed product -----------------------------------------------------------


def test_decode_output_rejects_garbage():
    config = RingConfig()
    in_features = 64
    scale = torch.ones(64, dtype=torch.float64)
    garbage = ChaChaStream(b"\x07" * 32).int64((64,))
    with pytest.raises(RingOverflowError):
        decode_output(garbage, scale, in_features, config)
    limit = config.output_limit(in_features)
    for bad in (INT64_MIN, INT64_MAX, limit + 1, -limit - 1):
        y = torch.tensor([0, bad, 5], dtype=torch.int64)
        with pytest.raises(RingOverflowError):
            decode_output(y, torch.ones(3, dtype=torch.float64), in_features, config)
    # the boundary itself is a legitimate value
    y = torch.tensor([limit, -limit], dtype=torch.int64)
    out = decode_output(y, torch.ones(2, dtype=torch.float64), in_features, config)
    assert out.tolist() == [limit / 2**16, -limit / 2**16]


@pytest.mark.parametrize("frac_bits", [16, 20])
def test_end_to_end_shared_linear_matches_float(frac_bits):
    torch.manual_seed(0)  # test data only; masks come from the CSPRNG inside share()
    config = RingConfig(frac_bits=frac_bits)
    out_features, in_features = 24, 96
    weight = torch.randn(out_features, in_features, dtype=torch.float64) * 0.05
    weight[3] = 0.0  # an all-zero row must decode to exactly zero
    x = torch.randn(5, in_features, dtype=torch.float64) * 4.0
    w_int, scale = quantize_weight(weight, config)
    kernel = RingWeight(w_int)
    shares = share(encode(x, config))
    y_int = reconstruct(kernel.matmul(shares.a), kernel.matmul(shares.b))
    assert torch.equal(y_int, ring_matmul_reference(encode(x, config), w_int))
    y = decode_output(y_int, scale, in_features, config)
    expected = x @ weight.T
    # Weight rounding costs <= s/2 = max|W_row| / (2 * 32767) per entry: ~1.5e-5 relative to the row,
    # plus 2^-(f+1) per activation; 1e-3 of the largest output leaves a wide margin.
    rel = (y - expected).abs().max().item() / expected.abs().max().item()
    assert rel <= 1e-3
    assert torch.all(y[:, 3] == 0)


# -- weight quantisation --------------------------------------------------------------------------


@pytest.mark.parametrize("weight_bits", [16, 8, 2])
def test_quantize_weight_bounds_and_zero_rows(weight_bits):
    torch.manual_seed(1)
    config = RingConfig(weight_bits=weight_bits)
    weight = torch.randn(10, 33, dtype=torch.float32) * torch.logspace(-4, 2, 10).unsqueeze(1)
    weight[0] = 0.0
    weight[5] = 0.0
    w_int, scale = quantize_weight(weight, config)
    assert w_int.dtype == torch.int64 and scale.dtype == torch.float64
    assert scale.shape == (10,)
    assert w_int.abs().max().item() <= config.weight_max
    # all-zero rows: integers zero, scale exactly 1
    for r in (0, 5):
        assert torch.all(w_int[r] == 0) and scale[r].item() == 1.0
    w64 = weight.to(torch.float64)
    for r in [i for i in range(10) if i not in (0, 5)]:
        peak = w64[r].abs().max()
        assert torch.isclose(scale[r], peak / config.weight_max, rtol=1e-15, atol=0.0)
        # the largest-magnitude entry maps to exactly +-weight_max
        assert w_int[r].abs().max().item() == config.weight_max
        # rounding error at most half a step
        assert (w_int[r] * scale[r] - w64[r]).abs().max().item() <= scale[r].item() / 2 * (1 + 1e-12)


def test_ring_config_validation():
    with pytest.raises(ValueError):
        RingConfig(frac_bits=0)
    with pytest.raises(ValueError):
        RingConfig(weight_bits=17)
    assert RingConfig().weight_max == W_MAX
