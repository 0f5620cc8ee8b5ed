"""Per-architecture EE specifications: which tensor gets which transform (DESIGN.md §5).

A spec is built once per conversion from the model config and a CSPRNG. The converter streams the
checkpoint tensor by tensor through [`EESpec.transform`]; per-layer secrets are drawn on first use
so that memory stays bounded by one layer's worth of transforms plus the residual rotation.
Vectors a weight needs from elsewhere (the norm weights folded into the next layer) are read in a
first pass: [`EESpec.needs_first_pass`] names them.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch

from ..artifacts.stages import FAMILIES
from ..errors import ConversionError, UnsupportedArchitectureError
from ..ring.csprng import ChaChaStream
from .transforms import AttentionTransform, MLPTransform, orthogonal_fixing_ones

VOCAB_BLOCK_ROWS = 4096


class EESpec:
    """Base class: an architecture family's EE recipe.

    Args:
        config (`PretrainedConfig`): the original model's config.
        rng (`ChaChaStream`): the converter's secret randomness.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    architectures: ClassVar[tuple[str, ...]] = ()
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    """The transformers Auto class that loads the original and the EE checkpoint (verification, servers)."""

    def __init__(self, config, rng: ChaChaStream):
        self.config = config
        self.rng = rng
        self.hidden = self._hidden_size()
        self.vocab_perm = rng.permutation(self.output_size())
        self.source_names: set[str] = set()  # every tensor name of the source; the converter fills it in
        self._attn: dict[int, AttentionTransform] = {}
        self._mlp: dict[int, MLPTransform] = {}
        self.rotation = self._draw_rotation()

    def _hidden_size(self) -> int:
        return self.config.hidden_size

    def output_size(self) -> int:
        """Length of the secret output permutation `pi` (the vocabulary; the labels of a classifier)."""
        return self.config.vocab_size

    # -- verification (conversion checks `logits_EE(ee_inputs(x))[..., pi] == logits(x)`) ----------
    def verification_inputs(self, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
        """Random inputs of the original model, drawn from the CSPRNG."""
        return {"input_ids": torch.remainder(ChaChaStream().int64((batch, length)), self.config.vocab_size)}

    def ee_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same inputs as the EE model takes them (token ids through `pi`)."""
        return {name: self.vocab_perm[t] if name.endswith("input_ids") else t for name, t in inputs.items()}

    # -- what subclasses describe ------------------------------------------------------------
    def _draw_rotation(self) -> torch.Tensor:
        return self.rng.orthogonal(self.hidden)

    def _draw_attention(self) -> AttentionTransform:
        raise NotImplementedError

    def _draw_mlp(self) -> MLPTransform:
        raise NotImplementedError

    def needs_first_pass(self, name: str) -> bool:
        """Whether `name` must be read before the others (a vector folded into other weights)."""
        raise NotImplementedError

    def transform(self, name: str, tensor: torch.Tensor, small: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns the EE tensors that replace `name` (usually one; the embedding also emits an untied head)."""
        raise NotImplementedError

    @classmethod
    def architecture_for(cls, config) -> str:
        """The HF class name the EE checkpoint declares (the original's causal-LM class)."""
        return cls.architectures[cls.model_types.index(config.model_type)]

    def ee_config(self, config):
        """The EE model's config: the same architecture, embeddings untied."""
        config.tie_word_embeddings = False
        return config

    # -- shared helpers ----------------------------------------------------------------------
    def attention(self, layer: int) -> AttentionTransform:
        if layer not in self._attn:
            self._attn[layer] = self._draw_attention()
        return self._attn[layer]

    def mlp(self, layer: int) -> MLPTransform:
        if layer not in self._mlp:
            self._mlp[layer] = self._draw_mlp()
        return self._mlp[layer]

    def input_side(self, w: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """`W diag(gamma) Q`: a weight reading the rotated residual stream through a folded norm."""
        if gamma is not None:
            w = w * gamma.to(torch.float64).unsqueeze(0)
        return w @ self.rotation

    def output_side(self, w: torch.Tensor) -> torch.Tensor:
        """`Q.T W`: a weight (or a bias as a column) writing into the residual stream."""
        return self.rotation.T @ w

    def embedding(self, table: torch.Tensor) -> torch.Tensor:
        """`E_ee[pi[t]] = E[t] Q`, for the token embedding and for output heads."""
        return self._rows_through(table, None)

    def head(self, w: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """lm_head: reads the rotated final norm (gamma folded), rows permuted like the vocabulary."""
        return self._rows_through(w, gamma)

    def _rows_through(self, table: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """`out[pi[t]] = (table[t] * gamma) Q` in float64, a block of rows at a time into a float32 result.

        Vocabulary-sized tables are the largest tensors of a model; blocks keep the float64 work to a few
        MB instead of several copies of the whole table.
        """
        out = torch.empty(table.shape, dtype=torch.float32)
        for start in range(0, table.shape[0], VOCAB_BLOCK_ROWS):
            block = table[start : start + VOCAB_BLOCK_ROWS].to(torch.float64)
            out[self.vocab_perm[start : start + VOCAB_BLOCK_ROWS]] = self.input_side(block, gamma).to(torch.float32)
        return out


def layer_index(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))


class LlamaFamilySpec(EESpec):
    """Llama, Mistral and Qwen2: RMSNorm, rotary embeddings, GQA, SwiGLU, optional q/k/v biases."""

    model_types = FAMILIES["llama"]
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def __init__(self, config, rng: ChaChaStream):
        self.num_heads = config.num_attention_heads
        self.num_groups = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        rope = getattr(config, "rope_parameters", None) or {}
        if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise UnsupportedArchitectureError("partial rotary embeddings are not supported by the EE transforms")
        super().__init__(config, rng)

    def _draw_attention(self) -> AttentionTransform:
        return AttentionTransform.draw(self.rng, self.num_heads, self.num_groups, self.head_dim, rope=True)

    def _draw_mlp(self) -> MLPTransform:
        return MLPTransform.draw(self.rng, self.config.intermediate_size, gated=True)

    def needs_first_pass(self, name: str) -> bool:
        return name.endswith("layernorm.weight") or name == "model.norm.weight"

    def transform(self, name, tensor, small):
        if name == "model.embed_tokens.weight":
            out = {name: self.embedding(tensor)}
            if self.config.tie_word_embeddings:
                out["lm_head.weight"] = self.head(tensor, small["model.norm.weight"])
            return out
        if name == "lm_head.weight":
            if self.config.tie_word_embeddings:
                return {}  # the embedding emits the untied head
            return {name: self.head(tensor, small["model.norm.weight"])}
        w = tensor.to(torch.float64)
        if self.needs_first_pass(name):
            return {name: torch.ones_like(w)}
        layer = layer_index(name)
        prefix = f"model.layers.{layer}."
        attn, mlp = self.attention(layer), self.mlp(layer)
        kind = name[len(prefix) :]
        col = w.dim() == 1  # biases travel as a column through the same row transforms
        w2 = w.unsqueeze(1) if col else w
        gamma1 = small[prefix + "input_layernorm.weight"]
        gamma2 = small[prefix + "post_attention_layernorm.weight"]
        if kind.startswith("self_attn.q_proj"):
            res = attn.query(w2 if col else self.input_side(w2, gamma1))
        elif kind.startswith("self_attn.k_proj"):
            res = attn.key(w2 if col else self.input_side(w2, gamma1))
        elif kind.startswith("self_attn.v_proj"):
            res = attn.value(w2 if col else self.input_side(w2, gamma1))
        elif kind == "self_attn.o_proj.weight":
            res = self.output_side(attn.output(w2))
        elif kind.startswith("mlp.gate_proj"):
            res = mlp.rows(w2 if col else self.input_side(w2, gamma2))
        elif kind.startswith("mlp.up_proj"):
            res = mlp.rows(w2 if col else self.input_side(w2, gamma2), scaled=True)
        elif kind == "mlp.down_proj.weight":
            res = self.output_side(mlp.columns(w2))
        elif kind in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            res = self.output_side(w2)
        else:
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        return {name: res.squeeze(1) if col else res}


class GPT2Spec(EESpec):
    """GPT-2: LayerNorm (rotation fixes the ones vector), `Conv1D` weights, learned positions, GELU MLP."""

    model_types = FAMILIES["gpt2"]
    architectures = ("GPT2LMHeadModel",)

    def __init__(self, config, rng: ChaChaStream):
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        super().__init__(config, rng)

    def _draw_rotation(self) -> torch.Tensor:
        return orthogonal_fixing_ones(self.rng, self.hidden)

    def _draw_attention(self) -> AttentionTransform:
        return AttentionTransform.draw(self.rng, self.num_heads, self.num_heads, self.head_dim, rope=False)

    def _draw_mlp(self) -> MLPTransform:
        inner = self.config.n_inner or 4 * self.hidden
        return MLPTransform.draw(self.rng, inner, gated=False)

    def needs_first_pass(self, name: str) -> bool:
        return self._is_norm(name) or name.endswith(".bias")

    @staticmethod
    def _is_norm(name: str) -> bool:
        return ".ln_" in name or name.startswith("transformer.ln_f.")

    def _fold(self, name_w: str, w_conv: torch.Tensor, b: torch.Tensor, small, ln: str):
        """Linear view of a Conv1D reading a LayerNorm: `(W diag(g) Q, b + W beta)`."""
        w = w_conv.T  # Conv1D stores (in, out)
        gamma, beta = small[ln + ".weight"].to(torch.float64), small[ln + ".bias"].to(torch.float64)
        return self.input_side(w, gamma), b + w @ beta

    def transform(self, name, tensor, small):
        if name == "transformer.wte.weight":
            gamma = small["transformer.ln_f.weight"].to(torch.float64)
            return {name: self.embedding(tensor), "lm_head.weight": self.head(tensor, gamma)}
        if name == "lm_head.weight":
            if self.config.tie_word_embeddings:
                return {}  # the embedding emits the untied head
            return {name: self.head(tensor, small["transformer.ln_f.weight"])}
        w = tensor.to(torch.float64)
        if name == "transformer.wpe.weight":
            return {name: w @ self.rotation}
        if name == "transformer.ln_f.bias":
            gamma = small["transformer.ln_f.weight"].to(torch.float64)
            if gamma.abs().min().item() < 1e-6:
                raise ConversionError("ln_f has a near-zero weight; its bias cannot be folded into the EE head")
            return {name: (w / gamma) @ self.rotation}
        if self._is_norm(name):
            return {name: torch.ones_like(w) if name.endswith(".weight") else torch.zeros_like(w)}
        return self._block(name, w, small)

    def _block(self, name, w, small):
        layer = layer_index(name)
        prefix = f"transformer.h.{layer}."
        kind = name[len(prefix) :]
        attn, mlp = self.attention(layer), self.mlp(layer)
        if kind.endswith(".bias"):
            return {}  # biases are emitted with their weight (LayerNorm's beta folds into them)
        bias = small.get(prefix + kind[: -len("weight")] + "bias")
        if bias is None:
            raise ConversionError(f"{name}'s bias was not found in the first pass")
        b = bias.to(torch.float64).unsqueeze(1)
        if kind == "attn.c_attn.weight":
            w, b = self._fold(name, w, b.squeeze(1), small, prefix + "ln_1")
            b = b.unsqueeze(1)
            q, k, v = (torch.cat(p, dim=1) for p in zip(w.chunk(3, dim=0), b.chunk(3, dim=0), strict=False))
            lin = torch.cat([attn.query(q), attn.key(k), attn.value(v)], dim=0)
        elif kind == "attn.c_proj.weight":
            lin = self.output_side(torch.cat([attn.output(w.T), b], dim=1))
        elif kind == "mlp.c_fc.weight":
            wf, bf = self._fold(name, w, b.squeeze(1), small, prefix + "ln_2")
            lin = mlp.rows(torch.cat([wf, bf.unsqueeze(1)], dim=1))
        elif kind == "mlp.c_proj.weight":
            lin = self.output_side(torch.cat([mlp.columns(w.T), b], dim=1))
        else:
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        return {name: lin[:, :-1].T, prefix + kind[: -len("weight")] + "bias": lin[:, -1]}
