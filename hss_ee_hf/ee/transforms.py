"""The secret random transforms of Equivariant Encryption (DESIGN.md §5), drawn from a CSPRNG.

Conventions follow HF's `nn.Linear`: `y = x @ W.T`, `W` is `(out, in)`, activations are row
vectors. A transform `T` applied to an activation (`x_ee = x @ T`) is undone on the input side of
the next weight (`W <- W @ T`) and applied on the output side of the weight producing it
(`W <- T.T @ W`). Everything here is float64 and never leaves the converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ring.csprng import ChaChaStream

# Positive scalings are drawn log-uniformly from [1 / SCALE_SPREAD, SCALE_SPREAD].
SCALE_SPREAD = 2.0


def positive_scales(rng: ChaChaStream, n: int) -> torch.Tensor:
    """`n` positive scalars, log-uniform in `[1/SCALE_SPREAD, SCALE_SPREAD]`."""
    return torch.exp((2.0 * rng.uniform((n,)) - 1.0) * math.log(SCALE_SPREAD))


def orthogonal_fixing_ones(rng: ChaChaStream, n: int) -> torch.Tensor:
    """A random orthogonal `Q` with `Q @ 1 = 1`, so that LayerNorm's mean subtraction commutes with it.

    `Q = P + V O V.T` where `P` projects on the all-ones direction, `V` is an orthonormal basis of its
    complement and `O` is a Haar-random `(n-1) x (n-1)` orthogonal matrix.
    """
    ones = torch.full((n, 1), 1.0 / math.sqrt(n), dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.eye(n, dtype=torch.float64)[:, : n - 1]], dim=1))
    v = basis[:, 1:]  # orthonormal, orthogonal to ones (QR keeps the first column's span)
    return ones @ ones.T + v @ rng.orthogonal(n - 1) @ v.T


def rope_commuting_rotation(rng: ChaChaStream, head_dim: int) -> torch.Tensor:
    """An orthogonal `R` that commutes with rotary embeddings in HF's rotate-half layout.

    RoPE rotates each pair `(i, i + head_dim/2)` by a position-dependent angle. Independent 2x2
    rotations on the same pairs commute with it (planar rotations commute).
    """
    half = head_dim // 2
    phi = 2.0 * math.pi * rng.uniform((half,))
    r = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    idx = torch.arange(half)
    r[idx, idx] = torch.cos(phi)
    r[idx + half, idx + half] = torch.cos(phi)
    r[idx, idx + half] = torch.sin(phi)
    r[idx + half, idx] = -torch.sin(phi)
    return r


@dataclass
class AttentionTransform:
    """Per-layer secret attention transforms.

    Attributes:
        qk_rotation (`torch.Tensor`): `(groups, head_dim, head_dim)` rotations `R_g` on q and k.
        qk_scale (`torch.Tensor`): `(groups,)` positive `c_g` on q (and `1 / c_g` on k).
        v_mixing (`torch.Tensor`): `(groups, head_dim, head_dim)` orthogonal `U_g` on v (and o's columns).
        group_perm (`torch.Tensor`): new KV group `j` is old group `group_perm[j]`.
        head_perm (`torch.Tensor`): new query head `h` is old query head `head_perm[h]`.
    """

    qk_rotation: torch.Tensor
    qk_scale: torch.Tensor
    v_mixing: torch.Tensor
    group_perm: torch.Tensor
    head_perm: torch.Tensor

    @classmethod
    def draw(cls, rng: ChaChaStream, num_heads: int, num_groups: int, head_dim: int, rope: bool) -> AttentionTransform:
        rotation = [
            rope_commuting_rotation(rng, head_dim) if rope else rng.orthogonal(head_dim) for _ in range(num_groups)
        ]
        mixing = [rng.orthogonal(head_dim) for _ in range(num_groups)]
        group_perm = rng.permutation(num_groups)
        rep = num_heads // num_groups
        head_perm = torch.cat([group_perm[j] * rep + rng.permutation(rep) for j in range(num_groups)])
        return cls(torch.stack(rotation), positive_scales(rng, num_groups), torch.stack(mixing), group_perm, head_perm)

    @property
    def num_groups(self) -> int:
        return self.qk_rotation.shape[0]

    def _heads(self, w: torch.Tensor, n: int) -> torch.Tensor:
        return w.reshape(n, -1, *w.shape[1:])  # (n, head_dim, ...) rows of each head

    def query(self, w: torch.Tensor) -> torch.Tensor:
        """q_proj rows (weight `(H*hd, in)` or bias `(H*hd, 1)`): `c_g R_g.T W_h`, heads permuted."""
        heads = self._heads(w, self.head_perm.numel())
        group = torch.arange(heads.shape[0]) // (heads.shape[0] // self.num_groups)
        rot = self.qk_rotation[group].transpose(1, 2) * self.qk_scale[group].view(-1, 1, 1)
        return (rot @ heads)[self.head_perm].reshape(w.shape)

    def key(self, w: torch.Tensor) -> torch.Tensor:
        """k_proj rows: `R_g.T W_g / c_g`, groups permuted."""
        groups = self._heads(w, self.num_groups)
        rot = self.qk_rotation.transpose(1, 2) / self.qk_scale.view(-1, 1, 1)
        return (rot @ groups)[self.group_perm].reshape(w.shape)

    def value(self, w: torch.Tensor) -> torch.Tensor:
        """v_proj rows: `U_g.T W_g`, groups permuted."""
        groups = self._heads(w, self.num_groups)
        return (self.v_mixing.transpose(1, 2) @ groups)[self.group_perm].reshape(w.shape)

    def output(self, w: torch.Tensor) -> torch.Tensor:
        """o_proj columns (weight `(out, H*hd)`): head `h` of group `g` becomes `W[:, h] U_g`, heads permuted."""
        n_heads = self.head_perm.numel()
        cols = w.T.reshape(n_heads, -1, w.shape[0])  # (H, hd, out)
        group = torch.arange(n_heads) // (n_heads // self.num_groups)
        mixed = self.v_mixing[group].transpose(1, 2) @ cols  # (W[:, h] U).T = U.T W[:, h].T
        return mixed[self.head_perm].reshape(-1, w.shape[0]).T


@dataclass
class MLPTransform:
    """Per-layer MLP transforms: a permutation of the intermediate units and (gated MLPs only) positive scaling.

    Attributes:
        perm (`torch.Tensor`): new unit `j` is old unit `perm[j]`.
        scale (`torch.Tensor` or `None`): `(ff,)` positive scaling of up_proj rows (indexed by old unit).
    """

    perm: torch.Tensor
    scale: torch.Tensor | None

    @classmethod
    def draw(cls, rng: ChaChaStream, intermediate: int, gated: bool) -> MLPTransform:
        return cls(rng.permutation(intermediate), positive_scales(rng, intermediate) if gated else None)

    def rows(self, w: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """gate/up/fc rows (or their bias as a column) permuted; `scaled` multiplies by the scale first."""
        if scaled and self.scale is not None:
            w = w * self.scale.view(-1, *([1] * (w.dim() - 1)))
        return w[self.perm]

    def columns(self, w: torch.Tensor) -> torch.Tensor:
        """down/proj columns permuted and divided by the scale."""
        if self.scale is not None:
            w = w / self.scale.unsqueeze(0)
        return w[:, self.perm]
