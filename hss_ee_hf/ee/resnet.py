"""The EE specification of ResNet classifiers (DESIGN.md §5; the shared contract is in `vision.py`).

Every BatchNorm is folded into the convolution before it, then each activation site gets a secret channel
permutation and positive per-channel scaling (both commute with ReLU, max pooling, zero padding and average
pooling). There is no residual rotation: a rotation would not commute with ReLU.
"""

from __future__ import annotations

import re

import torch

from ..artifacts.layouts import resnet_layers
from ..artifacts.stages import FAMILIES
from ..errors import ConversionError, UnsupportedArchitectureError
from ..ring.csprng import ChaChaStream
from .vision import BATCH_NORM_EPS, BN_TENSORS, RESNET_VERIFY_IMAGE, ChannelTransform, ConvSites, VisionSpec


class ResNetSpec(VisionSpec):
    """ResNet (`ResNetForImageClassification`): BatchNorm folded, per-site channel permutations and scalings.

    The EE checkpoint keeps HF's layout: each convolution (bias-free) holds its EE weight `W'` and its BatchNorm
    becomes an exact per-channel bias add: weight 1, bias the EE'd folded bias, running mean 0, running variance
    `1 - eps` (so `sqrt(var + eps) == 1`); `num_batches_tracked` is kept. A convolution reading site `in` and
    writing site `out` becomes `W_ee[j, i] = W'[p_out[j], p_in[i]] * d_out[j] / d_in[i]`. Layers with an identity
    shortcut write the site they read; a projection shortcut starts a new residual site. The classifier reads the
    last residual site through average pooling and its rows are permuted by `pi`.

    Args:
        config (`ResNetConfig`): the original model's config.
        rng (`ChaChaStream`): the converter's secret randomness.
    """

    model_types = FAMILIES["resnet"]
    architectures = ("ResNetForImageClassification",)

    def __init__(self, config, rng: ChaChaStream):
        if config.layer_type not in ("basic", "bottleneck"):
            raise UnsupportedArchitectureError(f"ResNet layer_type {config.layer_type!r} is not supported")
        super().__init__(config, rng)
        self.sites: list[ChannelTransform] = []
        self.convs: dict[str, ConvSites] = {}
        self._layout_checked = False
        self._plan()

    # -- the plan: which site every convolution reads and writes -----------------------------------
    def _site(self, channels: int) -> int:
        self.sites.append(ChannelTransform.draw(self.rng, channels))
        return len(self.sites) - 1

    def _plan(self) -> None:
        current = self._site(self.config.embedding_size)
        self.convs["resnet.embedder.embedder"] = ConvSites(None, current)
        for layer in resnet_layers(self.config):
            residual = current
            if layer.shortcut:
                residual = self._site(layer.out_channels)
                self.convs[layer.prefix + "shortcut"] = ConvSites(current, residual)
            reads = current
            for k, width in enumerate(layer.widths):
                writes = residual if k == len(layer.widths) - 1 else self._site(width)
                self.convs[f"{layer.prefix}layer.{k}"] = ConvSites(reads, writes)
                reads = writes
            current = residual
        self.last_site = current

    def conv_modules(self) -> list[str]:
        """The `ResNetConvLayer`/`ResNetShortCut` module paths (each holds `.convolution` and `.normalization`)."""
        return list(self.convs)

    def _check_layout(self) -> None:
        """Compares the planned shortcuts with the source's tensor names, once (when the converter lists them)."""
        if self._layout_checked or not self.source_names:
            return
        self._layout_checked = True
        found = {
            m.group(1)
            for n in map(self.canonical_name, self.source_names)
            if (m := re.fullmatch(r"(.*)\.convolution\.weight", n))
        }
        if found != set(self.convs):
            missing, extra = sorted(set(self.convs) - found), sorted(found - set(self.convs))
            raise ConversionError(
                f"the ResNet checkpoint does not match its config: missing convolutions {missing[:4]}, "
                f"unexpected {extra[:4]}"
            )

    # -- EESpec --------------------------------------------------------------------------------
    def _hidden_size(self) -> int:
        return self.config.hidden_sizes[-1]

    def _draw_rotation(self) -> None:
        return None  # no residual rotation: ReLU commutes only with permutations and positive scalings

    def input_side(self, w: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """The classifier's input side: it reads the last residual site (average pooling keeps the transform)."""
        site = self.sites[self.last_site]
        if gamma is not None or w.shape[1] != site.channels:
            raise ConversionError(f"the classifier reads {w.shape[1]} features, the config says {site.channels}")
        return site.columns(w)

    @staticmethod
    def canonical_name(name: str) -> str:
        """A bare `ResNetModel` checkpoint lacks the `resnet.` prefix."""
        return "resnet." + name if name.startswith(("embedder.", "encoder.")) else name

    def _image_size(self) -> tuple[int, int]:
        return RESNET_VERIFY_IMAGE, RESNET_VERIFY_IMAGE

    def needs_first_pass(self, name: str) -> bool:
        return ".normalization." in name and not name.endswith("num_batches_tracked")

    def _folded(self, module: str, small: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A BatchNorm as `y * scale + shift` (float64).

        `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`.

        Raises:
            `ConversionError`: a BatchNorm tensor is missing from the first pass.
        """
        vec = self._vectors(small)
        try:
            gamma, beta, mean, var = (vec[f"{module}.normalization.{t}"] for t in BN_TENSORS)
        except KeyError as err:
            raise ConversionError(f"{module}'s BatchNorm was not found in the first pass ({err})") from None
        scale = gamma / torch.sqrt(var + BATCH_NORM_EPS)
        return scale, beta - mean * scale

    def transform(self, name, tensor, small):
        self._check_layout()
        canonical = self.canonical_name(name)
        if canonical == "classifier.1.weight":
            return {canonical: self.head(tensor, None)}
        if canonical == "classifier.1.bias":
            return {canonical: self._permuted_bias(tensor)}
        m = re.fullmatch(r"(.*)\.(convolution|normalization)\.(\w+)", canonical)
        if m is None or m.group(1) not in self.convs:
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        module, part, kind = m.groups()
        sites = self.convs[module]
        out_site = self.sites[sites.writes]
        if part == "convolution":
            if kind != "weight":
                raise ConversionError(f"{name}: ResNet convolutions have no bias; unexpected layout")
            if tensor.shape[0] != out_site.channels:
                raise ConversionError(
                    f"{name} has {tensor.shape[0]} output channels, the config says {out_site.channels}"
                )
            scale, _ = self._folded(module, small)
            w = tensor.to(torch.float64) * scale.view(-1, 1, 1, 1)
            w = out_site.rows(w)
            if sites.reads is not None:
                if tensor.shape[1] != self.sites[sites.reads].channels:
                    raise ConversionError(f"{name} has {tensor.shape[1]} input channels, the config disagrees")
                w = self.sites[sites.reads].columns(w)
            return {canonical: w.to(torch.float32)}
        prefix = f"{module}.normalization."
        if kind == "num_batches_tracked":
            return {canonical: tensor}
        if kind == "weight":
            return {canonical: torch.ones(tensor.shape, dtype=torch.float32)}
        if kind == "bias":
            _, shift = self._folded(module, small)
            return {canonical: out_site.rows(shift).to(torch.float32)}
        if kind == "running_mean":
            return {canonical: torch.zeros(tensor.shape, dtype=torch.float32)}
        if kind == "running_var":
            return {canonical: torch.full(tensor.shape, 1.0 - BATCH_NORM_EPS, dtype=torch.float32)}
        raise ConversionError(
            f"no EE transform for tensor {prefix + kind!r}; this checkpoint has an unexpected layout"
        )
