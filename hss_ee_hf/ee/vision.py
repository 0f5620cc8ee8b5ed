"""EE specifications and stage layouts of the vision classifiers: ResNet and ViT (DESIGN.md §5).

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

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .csprng import ChaChaStream
from .ee_math import AttentionTransform, MLPTransform, orthogonal_fixing_ones, positive_scales
from .ee_specs import EESpec, _layer
from .errors import ConversionError, UnsupportedArchitectureError
from .stages import Stage, StagePart

BATCH_NORM_EPS = 1e-5
"""`nn.BatchNorm2d`'s default eps, the one transformers' ResNet uses (its config does not set it)."""

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")

RESNET_VERIFY_IMAGE = 64
"""Side of the random verification images of a ResNet (fully convolutional: any size above 32 works)."""


def _pair(value) -> tuple[int, int]:
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


@dataclass(frozen=True)
class ResNetLayer:
    """One `ResNetBasicLayer`/`ResNetBottleNeckLayer` as its config builds it.

    Attributes:
        prefix (`str`): module path with a trailing dot, e.g. `resnet.encoder.stages.0.layers.0.`.
        out_channels (`int`): channels of the residual stream it writes.
        shortcut (`bool`): whether it has a projection shortcut (`ResNetShortCut`) instead of the identity.
        widths (`tuple[int, ...]`): output channels of its main-branch convolutions `layer.0`, `layer.1`, ...
    """

    prefix: str
    out_channels: int
    shortcut: bool
    widths: tuple[int, ...]


def resnet_layers(config) -> list[ResNetLayer]:
    """The residual layers of a ResNet config, deciding shortcuts exactly as transformers' ResNet modules do.

    `ResNetEncoder` builds stage 0 with stride 2 only if `downsample_in_first_stage`, later stages with stride 2;
    only a stage's first layer strides and changes channels; a layer gets a projection shortcut when its input and
    output channels differ or its stride is not 1. Bottleneck layers reduce to `out_channels // 4` inside.
    """
    layers = []
    in_channels = config.embedding_size
    for s, (out_channels, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        stage_stride = 2 if s > 0 or config.downsample_in_first_stage else 1
        for i in range(depth):
            layer_in, stride = (in_channels, stage_stride) if i == 0 else (out_channels, 1)
            if config.layer_type == "bottleneck":
                widths = (out_channels // 4, out_channels // 4, out_channels)
            else:
                widths = (out_channels, out_channels)
            shortcut = layer_in != out_channels or stride != 1
            layers.append(ResNetLayer(f"resnet.encoder.stages.{s}.layers.{i}.", out_channels, shortcut, widths))
        in_channels = out_channels
    return layers


class _VisionSpec(EESpec):
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


class ResNetSpec(_VisionSpec):
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

    model_types = ("resnet",)
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
            gamma, beta, mean, var = (vec[f"{module}.normalization.{t}"] for t in _BN_TENSORS)
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


_VIT_RENAMES: tuple[tuple[re.Pattern, str], ...] = (  # transformers 4.x -> 5 names (as `conversion_mapping.py`)
    (re.compile(r"^(?:vit\.)?encoder\.layer\.(\d+)\."), r"vit.layers.\1."),
    (re.compile(r"^(embeddings|layernorm|pooler)\."), r"vit.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
)


class ViTSpec(_VisionSpec):
    """ViT (`ViTForImageClassification`): the GPT-2 recipe on a pre-LayerNorm encoder.

    A residual rotation `Q` fixing the all-ones vector (LayerNorm commutes with it); each LayerNorm's weight
    and bias fold into the linear layers reading it (q/k/v, fc1, the classifier), the norms become identity
    affine maps. The patch embedding (a strided `Conv2d`), the CLS token and the position embeddings write the
    rotated residual stream (`@ Q` on the channels; interpolating the position embeddings acts on positions, so
    it commutes). Per layer: attention transforms on q/k/v/o, a permutation of the MLP units (GELU is
    element-wise). The classifier reads the CLS token through the final LayerNorm; its rows are permuted by `pi`.

    Tensors `ViTForImageClassification` does not have (`vit.pooler.*`, `vit.embeddings.mask_token` of a ViTModel
    or masked-image-modeling checkpoint) are dropped.

    Args:
        config (`ViTConfig`): the original model's config.
        rng (`ChaChaStream`): the converter's secret randomness.
    """

    model_types = ("vit",)
    architectures = ("ViTForImageClassification",)

    def __init__(self, config, rng: ChaChaStream):
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        super().__init__(config, rng)

    @staticmethod
    def canonical_name(name: str) -> str:
        """Transformers 4.x names (`vit.encoder.layer.0.attention.attention.query.weight`) to transformers 5's."""
        for pattern, repl in _VIT_RENAMES:
            name = pattern.sub(repl, name)
        return name

    def _image_size(self) -> tuple[int, int]:
        return _pair(self.config.image_size)

    def _draw_rotation(self) -> torch.Tensor:
        return orthogonal_fixing_ones(self.rng, self.hidden)

    def _draw_attention(self) -> AttentionTransform:
        return AttentionTransform.draw(self.rng, self.num_heads, self.num_heads, self.head_dim, rope=False)

    def _draw_mlp(self) -> MLPTransform:
        return MLPTransform.draw(self.rng, self.config.intermediate_size, gated=False)

    @staticmethod
    def _is_norm(name: str) -> bool:
        return ".layernorm_before." in name or ".layernorm_after." in name or name.startswith("vit.layernorm.")

    def needs_first_pass(self, name: str) -> bool:
        name = self.canonical_name(name)
        folded_bias = name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", ".fc1.bias"))
        return self._is_norm(name) or folded_bias or name == "classifier.bias"

    def _folded_bias(self, w: torch.Tensor, bias_name: str, ln: str, small) -> torch.Tensor | None:
        """`b + W beta` of a linear reading LayerNorm `ln` (`None`: the linear has no bias and beta is 0)."""
        vec = self._vectors(small)
        if ln + ".bias" not in vec:
            raise ConversionError(f"{ln}.bias was not found in the first pass")
        beta, bias = vec[ln + ".bias"], vec.get(bias_name)
        if bias is None:
            if beta.abs().max().item() != 0.0:
                raise ConversionError(f"{bias_name} is missing: {ln}'s bias cannot be folded into a bias-free linear")
            return None
        return bias + w @ beta

    def _gamma(self, ln: str, small) -> torch.Tensor:
        vec = self._vectors(small)
        if ln + ".weight" not in vec:
            raise ConversionError(f"{ln}.weight was not found in the first pass")
        return vec[ln + ".weight"]

    def transform(self, name, tensor, small):
        name = self.canonical_name(name)
        w = tensor.to(torch.float64)
        if name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"):
            return {name: (w @ self.rotation).to(torch.float32)}
        if name.startswith("vit.pooler.") or name == "vit.embeddings.mask_token":
            return {}  # not part of ViTForImageClassification
        if name == "vit.embeddings.patch_embeddings.projection.weight":  # (d, C, p, p): output channels rotated
            return {name: self.output_side(w.reshape(w.shape[0], -1)).reshape(w.shape).to(torch.float32)}
        if name == "vit.embeddings.patch_embeddings.projection.bias":
            return {name: (w @ self.rotation).to(torch.float32)}
        if self._is_norm(name):
            fill = torch.ones if name.endswith(".weight") else torch.zeros
            return {name: fill(tensor.shape, dtype=torch.float32)}
        if name == "classifier.weight":
            out = {name: self.head(w, self._gamma("vit.layernorm", small))}
            bias = self._folded_bias(w, "classifier.bias", "vit.layernorm", small)
            if bias is not None:
                out["classifier.bias"] = self._permuted_bias(bias)
            return out
        if name == "classifier.bias":
            return {}  # emitted with the weight (the final LayerNorm's bias folds into it)
        if name.startswith("vit.layers."):
            return self._block(name, w, small)
        raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")

    def _block(self, name: str, w: torch.Tensor, small) -> dict[str, torch.Tensor]:
        layer = _layer(name)
        prefix = f"vit.layers.{layer}."
        kind = name[len(prefix) :]
        attn, mlp = self.attention(layer), self.mlp(layer)
        if kind in ("attention.o_proj.bias", "mlp.fc2.bias"):
            return {name: self.output_side(w.unsqueeze(1)).squeeze(1).to(torch.float32)}
        if kind == "attention.o_proj.weight":
            return {name: self.output_side(attn.output(w)).to(torch.float32)}
        if kind == "mlp.fc2.weight":
            return {name: self.output_side(mlp.columns(w)).to(torch.float32)}
        reading_norm = {
            "attention.q_proj": (attn.query, "layernorm_before"),
            "attention.k_proj": (attn.key, "layernorm_before"),
            "attention.v_proj": (attn.value, "layernorm_before"),
            "mlp.fc1": (mlp.rows, "layernorm_after"),
        }
        module, _, param = kind.rpartition(".")
        if module not in reading_norm or param not in ("weight", "bias"):
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        if param == "bias":
            return {}  # emitted with the weight (the LayerNorm's bias folds into it)
        rows, ln = reading_norm[module]
        weight = self.input_side(w, self._gamma(prefix + ln, small))
        bias_name = f"{prefix}{module}.bias"
        bias = self._folded_bias(w, bias_name, prefix + ln, small)
        if bias is None:
            return {name: rows(weight).to(torch.float32)}
        lin = rows(torch.cat([weight, bias.unsqueeze(1)], dim=1))
        return {name: lin[:, :-1].to(torch.float32), bias_name: lin[:, -1].to(torch.float32)}


def resnet_stage_layout(config) -> list[Stage]:
    """Every `Conv2d` and `Linear` of `ResNetForImageClassification`, in forward order.

    Per layer the main branch comes first (stages `...conv0`, `...conv1`[, `...conv2`] for HF's `layer.{k}`), then
    the projection shortcut if the layer has one: `ResNet*Layer.forward` runs `self.layer` before `self.shortcut`.
    """
    stages = [Stage("embedder", (StagePart("resnet.embedder.embedder.convolution", kind="conv2d"),))]
    for layer in resnet_layers(config):
        name = layer.prefix[len("resnet.encoder.") : -1]
        for k in range(len(layer.widths)):
            stages.append(
                Stage(f"{name}.conv{k}", (StagePart(f"{layer.prefix}layer.{k}.convolution", kind="conv2d"),))
            )
        if layer.shortcut:
            stages.append(
                Stage(f"{name}.shortcut", (StagePart(layer.prefix + "shortcut.convolution", kind="conv2d"),))
            )
    return stages + [Stage("classifier", (StagePart("classifier.1", permuted_output=True),))]


def vit_stage_layout(config) -> list[Stage]:
    """Every `Conv2d` and `Linear` of `ViTForImageClassification` (transformers 5 names), in forward order."""
    stages = [Stage("patch_embed", (StagePart("vit.embeddings.patch_embeddings.projection", kind="conv2d"),))]
    for i in range(config.num_hidden_layers):
        p = f"vit.layers.{i}."
        stages += [
            Stage(f"layers.{i}.qkv", tuple(StagePart(p + f"attention.{x}_proj") for x in "qkv")),
            Stage(f"layers.{i}.o", (StagePart(p + "attention.o_proj"),)),
            Stage(f"layers.{i}.up", (StagePart(p + "mlp.fc1"),)),
            Stage(f"layers.{i}.down", (StagePart(p + "mlp.fc2"),)),
        ]
    return stages + [Stage("classifier", (StagePart("classifier", permuted_output=True),))]


def vision_stage_layout(config) -> list[Stage]:
    """The stages of a vision classifier (dispatch on `config.model_type`).

    Raises:
        `UnsupportedArchitectureError`: not a ResNet or ViT config.
    """
    if config.model_type == "resnet":
        return resnet_stage_layout(config)
    if config.model_type == "vit":
        return vit_stage_layout(config)
    raise UnsupportedArchitectureError(f"no vision stage layout for model_type {config.model_type!r}")
