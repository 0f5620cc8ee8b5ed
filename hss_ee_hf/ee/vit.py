"""The EE specification of ViT classifiers (DESIGN.md §5; the shared contract is in `vision.py`).

A pre-LayerNorm transformer: the GPT-2 recipe. A residual rotation `Q` fixing the all-ones vector, LayerNorm
weights and biases folded into the next linear layers, per-layer attention and MLP transforms.
"""

from __future__ import annotations

import re

import torch

from ..artifacts.stages import FAMILIES
from ..errors import ConversionError
from ..ring.csprng import ChaChaStream
from .specs import layer_index
from .transforms import AttentionTransform, MLPTransform, orthogonal_fixing_ones
from .vision import VisionSpec, as_pair

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


class ViTSpec(VisionSpec):
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

    model_types = FAMILIES["vit"]
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
        return as_pair(self.config.image_size)

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
        layer = layer_index(name)
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
