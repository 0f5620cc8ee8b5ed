"""Additive secret sharing over Z_2^64 and the CSPRNG behind it (DESIGN.md §4)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hss_ee_hf.ring.csprng import SEED_BYTES, ChaChaStream, new_seed
from hss_ee_hf.ring.sharing import expand_share, reconstruct, share

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hss_ee_hf"

int64_values = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MAX, -1, 0, 1]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)


@st.composite
def int64_tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = 1
    for d in shape:
        n *= d
    values = draw(st.lists(int64_values, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.int64).reshape(shape)


@settings(max_examples=100, deadline=None)
@given(int64_tensors())
def test_share_reconstruct_exact(x):
    shares = share(x)
    assert shares.a.dtype == shares.b.dtype == torch.int64
    assert shares.a.shape == shares.b.shape == x.shape
    assert torch.equal(reconstruct(shares.a, shares.b), x)
    # the same identity in unbounded integers: a + b == x (mod 2^64)
    for a, b, v in zip(shares.a.flatten().tolist(), shares.b.flatten().tolist(), x.flatten().tolist(), strict=True):
        assert (a + b - v) % (1 << 64) == 0
    # party A's share is exactly what its seed expands to
    assert len(shares.seed) == SEED_BYTES
    assert torch.equal(expand_share(shares.seed, tuple(x.shape)), shares.a)


def test_masks_never_repeat():
    x = torch.zeros(4, 64, dtype=torch.int64)
    first, second = share(x), share(x)
    assert first.seed != second.seed
    assert not torch.equal(first.a, second.a)
    assert not torch.equal(first.b, second.b)
    # with x = 0 the share is the mask itself: it must not be all zero (a real mask, not a no-op)
    assert torch.count_nonzero(first.a).item() > 0.99 * first.a.numel()


def test_share_refuses_non_int64():
    for dtype in (torch.float32, torch.float64, torch.int32, torch.uint8):
        with pytest.raises(TypeError, match="int64"):
            share(torch.zeros(3, dtype=dtype))


def test_reconstruct_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        reconstruct(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))


def test_shares_repr_hides_secrets():
    shares = share(torch.tensor([123456789, -987654321], dtype=torch.int64))
    text = repr(shares)
    assert text == "Shares(shape=(2,))"
    assert shares.seed.hex() not in text


# -- the CSPRNG -----------------------------------------------------------------------------------


def test_chacha_same_seed_same_bytes():
    seed = bytes(range(32))
    a, b = ChaChaStream(seed), ChaChaStream(seed)
    assert a.bytes(1000) == b.bytes(1000)
    assert torch.equal(a.int64((7, 3)), b.int64((7, 3)))
    # the stream advances: successive draws differ
    c = ChaChaStream(seed)
    assert c.bytes(64) != c.bytes(64)


def test_chacha_known_answer():
    # RFC 8439 §2.4.2-style check via the cryptography library: all-zero key, all-zero nonce and counter
    # gives the well-known first keystream block of ChaCha20.
    first = ChaChaStream(bytes(32)).bytes(16)
    assert first.hex() == "76b8e0ada0f13d90405d6ae55386bd28"


def test_chacha_different_seeds_differ():
    a = ChaChaStream(bytes(32)).bytes(256)
    b = ChaChaStream(bytes(31) + b"\x01").bytes(256)
    c = ChaChaStream().bytes(256)
    assert len({a, b, c}) == 3
    assert new_seed() != new_seed()


def test_chacha_refuses_bad_seed_and_hides_it():
    for bad in (b"", b"\x00" * 31, b"\x00" * 33, "x" * 32):
        with pytest.raises(ValueError, match="32 bytes"):
            ChaChaStream(bad)
    seed = bytes(range(32))
    assert seed.hex() not in repr(ChaChaStream(seed))


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000])
def test_permutation_is_a_permutation(n):
    perm = ChaChaStream().permutation(n)
    assert perm.dtype == torch.int64
    assert torch.equal(torch.sort(perm).values, torch.arange(n))


def test_permutation_is_uniform_enough():
    # 6 permutations of 3 elements, 6000 draws: each count ~ Binomial(6000, 1/6), sd ~ 29.
    rng = ChaChaStream(b"\x42" * 32)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(6000):
        p = tuple(rng.permutation(3).tolist())
        counts[p] = counts.get(p, 0) + 1
    assert len(counts) == 6
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts
    # and a large one is not close to the identity
    big = rng.permutation(1000)
    assert (big == torch.arange(1000)).sum().item() < 20


@pytest.mark.parametrize("n", [1, 2, 5, 64, 200])
def test_orthogonal_is_orthogonal(n):
    q = ChaChaStream().orthogonal(n)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    assert (q.T @ q - eye).abs().max().item() < 1e-10
    assert (q @ q.T - eye).abs().max().item() < 1e-10


def test_orthogonal_is_random():
    rng = ChaChaStream()
    a, b = rng.orthogonal(16), rng.orthogonal(16)
    assert (a - b).abs().max().item() > 0.1
    assert (a - torch.eye(16, dtype=torch.float64)).abs().max().item() > 0.1


def test_uniform_in_open_unit_interval():
    u = ChaChaStream(b"\x01" * 32).uniform((100_000,))
    assert u.dtype == torch.float64 and u.shape == (100_000,)
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    # mean 1/2, sd of the mean ~ 0.29 / 316 ~ 9e-4
    assert abs(u.mean().item() - 0.5) < 5e-3
    assert abs(u.var().item() - 1.0 / 12.0) < 5e-3


def test_normal_moments():
    z = ChaChaStream(b"\x02" * 32).normal((100_000,))
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.02
    assert abs(z.std().item() - 1.0) < 0.02


def test_int64_covers_the_ring():
    v = ChaChaStream(b"\x03" * 32).int64((10_000,))
    # uniform over Z_2^64: about half negative, and the top and bottom bits both vary
    assert 0.45 < (v < 0).double().mean().item() < 0.55
    assert 0.45 < (v & 1).double().mean().item() < 0.55
    assert ChaChaStream().int64((0, 3)).shape == (0, 3)


# -- no insecure randomness in the library --------------------------------------------------------

FORBIDDEN = re.compile(
    r"\btorch\s*\.\s*(rand|randn|randint|randperm|rand_like|randn_like|randint_like|normal|bernoulli|multinomial)\s*\("
    r"|\bfrom\s+torch\s+import\s+[^\n]*\b(rand|randn|randint|randperm)\b"
    r"|\b(numpy|np)\s*\.\s*random\b"
    r"|\bfrom\s+numpy\s+import\s+[^\n]*\brandom\b"
    r"|\bfrom\s+numpy\.random\b"
    r"|^\s*import\s+random\b|^\s*from\s+random\s+import\b"
    r"|\.\s*(uniform_|normal_|random_|bernoulli_|exponential_)\s*\(",
    re.MULTILINE,
)


def _code_only(source: str) -> str:
    """The source with every string and comment blanked out, so docstrings that say "random" are ignored."""
    lines = source.splitlines(keepends=True)
    skip = {tokenize.STRING, tokenize.COMMENT}
    skip |= {getattr(tokenize, n) for n in ("FSTRING_MIDDLE", "TSTRING_MIDDLE") if hasattr(tokenize, n)}
    for tok in reversed(list(tokenize.generate_tokens(io.StringIO(source).readline))):
        if tok.type not in skip:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            start = c0 if r == r0 else 0
            end = c1 if r == r1 else len(line.rstrip("\n"))
            lines[r - 1] = line[:start] + " " * (end - start) + line[end:]
    return "".join(lines)


def _insecure_randomness(source: str) -> list[str]:
    return [m.group(0) for m in FORBIDDEN.finditer(_code_only(source))]


def test_scanner_catches_insecure_randomness():
    # the scanner below must be able to fail: each of these is flagged...
    for snippet in (
        "mask = torch.randint(0, 2**62, (4,))\n",
        "x = torch.rand(3)\n",
        "p = torch.randperm(10)\n",
        "import numpy as np\nr = np.random.default_rng()\n",
        "from numpy import random\n",
        "import random\n",
        "w.normal_(0, 1)\n",
        "from torch import randn\n",
    ):
        assert _insecure_randomness(snippet), snippet
    # ...while the same words in strings and comments are not
    assert not _insecure_randomness('"""never torch.randint or np.random"""\n# torch.rand(3)\nx = 1\n')


def test_no_insecure_randomness_in_library():
    files = sorted(p for p in PACKAGE_DIR.rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))
    assert any(p.name == "csprng.py" for p in files)
    offenders = {
        str(p.relative_to(PACKAGE_DIR)): hits
        for p in files
        if (hits := _insecure_randomness(p.read_text(encoding="utf-8")))
    }
    assert not offenders, f"insecure randomness (use hss_ee_hf.ring.csprng): {offenders}"
