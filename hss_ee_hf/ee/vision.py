"""What the EE specifications of the vision classifiers (ResNet in `resnet.py`, ViT in `vit.py`) share (DESIGN.md §5).

Both follow the text models' contract: the EE checkpoint is an ordinary checkpoint of the same architecture and
`logits_EE(pixel_values)[..., pi] == logits(pixel_values)`, `pi` a secret permutation of the class labels. The
image itself is not transformed.

* **ResNet** (convolutions, BatchNorm, ReLU): every BatchNorm is folded into the convolution before it, then each
  activation site gets a secret channel permutation and positive per-channel scaling (both commute with ReLU,
  max pooling, zero padding and average pooling). There is no residual rotation: a rotation would not commute
  with ReLU.
* **ViT** (a pre-LayerNorm transformer): the GPT-2 recipe. A residual rotation `Q` fixing the all-ones vector,
  LayerNorm weights and biases folded into the next linear layers, per-layer attention and MLP transforms.

Names: ViT checkpoints on the Hub use transformers 4.x names (`vit.encoder.layer.0.attention.attention.query`);
transformers 5 renames them at load time (`vit.layers.0.attention.q_proj`). The specs accept both and always
emit the current names, the ones `named_modules()` gives and [`vision_stage_layout`] uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import UnsupportedArchitectureError
from ..ring.csprng import ChaChaStream
from .specs import EESpec
from .transforms import positive_scales

BATCH_NORM_EPS = 1e-5
"""`nn.BatchNorm2d`'s default eps, the one transformers' ResNet uses (its config does not set it)."""

BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

RESNET_VERIFY_IMAGE = 64
"""Side of the random verification images of a ResNet (fully convolutional: any size above 32 works)."""


def as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Iterable) else (value, value)


@dataclass
class ChannelTransform:
    """A CNN activation site's secret transform: `x_ee[:, j] = x[:, perm[j]] * scale[j]`.

    Attributes:
        perm (`torch.Tensor`): new channel `j` is old channel `perm[j]`.
        scale (`torch.Tensor`): `(channels,)` positive scale of new channel `j` (float64).
    """

    perm: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def draw(cls, rng: ChaChaStream, channels: int) -> ChannelTransform:
        return cls(rng.permutation(channels), positive_scales(rng, channels))

    @property
    def channels(self) -> int:
        return self.perm.numel()

    def _view(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[dim] = -1
        return self.scale.view(shape)

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """Output side of a weight or bias writing this site: `W_ee[j] = W[perm[j]] * scale[j]`."""
        return w[self.perm] * self._view(w, 0)

    def columns(self, w: torch.Tensor) -> torch.Tensor:
        """Input side of a weight reading this site: `W_ee[:, i] = W[:, perm[i]] / scale[i]`."""
        return w[:, self.perm] / self._view(w, 1)


@dataclass(frozen=True)
class ConvSites:
    """Which activation sites a convolution reads and writes (`None`: the plain pixels)."""

    reads: int | None
    writes: int


class VisionSpec(EESpec):
    """What ResNet and ViT share: `pi` permutes the class labels, images go in untransformed, names normalised."""

    auto_class = "AutoModelForImageClassification"

    def __init__(self, config, rng: ChaChaStream):
        super().__init__(config, rng)
        self._small_source: dict[str, torch.Tensor] | None = None
        self._small: dict[str, torch.Tensor] = {}

    @staticmethod
    def canonical_name(name: str) -> str:
        """The name `named_modules()`/`state_dict()` of the transformers 5 model gives a source tensor."""
        return name

    def output_size(self) -> int:
        if self.config.num_labels < 1:
            raise UnsupportedArchitectureError(
                f"{self.config.model_type} without a classification head (num_labels=0) is not supported by the EE "
                "transforms"
            )
        return self.config.num_labels

    def _image_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def verification_inputs(self, batch: int = 2, length: int | None = None) -> dict[str, torch.Tensor]:
        """Random float32 images `(batch, num_channels, height, width)` from the CSPRNG (`length` is ignored)."""
        shape = (batch, self.config.num_channels, *self._image_size())
        return {"pixel_values": ChaChaStream().normal(shape).to(torch.float32)}

    def ee_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The EE model takes the very same images."""
        return dict(inputs)

    def ee_config(self, config):
        """The EE model's config: unchanged (there are no tied embeddings to untie)."""
        return config

    def _vectors(self, small: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The first-pass vectors in float64 under their canonical names (computed once per `small`)."""
        if small is not self._small_source:
            self._small = {self.canonical_name(n): t.to(torch.float64) for n, t in small.items()}
            self._small_source = small
        return self._small

    def _permuted_bias(self, b: torch.Tensor) -> torch.Tensor:
        """The classifier bias in the EE label order: `out[pi[t]] = b[t]`."""
        out = torch.empty(b.shape, dtype=torch.float32)
        out[self.vocab_perm] = b.to(torch.float32)
        return out
