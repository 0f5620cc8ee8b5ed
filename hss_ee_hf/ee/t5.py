"""EE transforms and linear stages of T5 (`T5ForConditionalGeneration`), the encoder-decoder family (DESIGN.md §5).

T5 differs from the decoder-only families in a few ways the transforms have to respect:

* One embedding table (`shared`) feeds both stacks, so one residual rotation `Q` serves the encoder and the
  decoder; the encoder's output reaches the decoder through the cross-attention keys and values, which read it
  through the encoder's `final_layer_norm` (its gamma folds into every decoder layer's `EncDecAttention.k/.v`).
* `T5LayerNorm` is RMS-style (no mean subtraction, no bias): any orthogonal `Q` commutes with it.
* There are no rotary embeddings but a learned relative position bias, computed from `relative_attention_bias` in
  layer 0 of a stack and added to the scores of every self-attention layer of that stack. The head permutation is
  therefore one per stack (shared by all its self-attention layers) and the bias table's columns follow it.
  Cross-attention has no position bias: its heads are permuted freely per layer.
* The decoder output is multiplied by `d_model**-0.5` before `lm_head` when `config.scale_decoder_outputs` is set
  (original T5); a scalar commutes with every transform, so the EE config keeps the flag as it is.
"""

from __future__ import annotations

import re

import torch

from ..artifacts.stages import FAMILIES
from ..errors import ConversionError
from ..ring.csprng import ChaChaStream
from .specs import EESpec
from .transforms import AttentionTransform, MLPTransform

_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# A legacy key: some old checkpoints store a relative bias for the cross-attention, which HF ignores on load.
_UNUSED = re.compile(r"^decoder\.block\.\d+\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")
_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)$")


class T5Spec(EESpec):
    """T5 and T5 v1.1 / Flan-T5: RMS-style norms, relative position bias, ReLU or gated-GELU MLP, encoder-decoder.

    Args:
        config (`T5Config`): the original model's config.
        rng (`ChaChaStream`): the converter's secret randomness.
    """

    model_types = FAMILIES["t5"]
    architectures = ("T5ForConditionalGeneration",)
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self, config, rng: ChaChaStream):
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.gated = bool(config.is_gated_act)
        self._stack_perm: dict[str, torch.Tensor] = {}
        self._t5_attn: dict[tuple[str, int, bool], AttentionTransform] = {}
        self._t5_mlp: dict[tuple[str, int], MLPTransform] = {}
        super().__init__(config, rng)

    def _hidden_size(self) -> int:
        return self.config.d_model

    def verification_inputs(self, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
        """Random encoder and decoder token ids, drawn from the CSPRNG; the decoder's start with its start token."""
        rng = ChaChaStream()
        vocab = self.config.vocab_size
        inputs = {
            "input_ids": torch.remainder(rng.int64((batch, length)), vocab),
            "decoder_input_ids": torch.remainder(rng.int64((batch, length)), vocab),
        }
        start = self.config.decoder_start_token_id
        if start is not None:
            inputs["decoder_input_ids"][:, 0] = start
        return inputs

    def ee_config(self, config):
        """The EE model's config: `lm_head` untied from `shared`, `scale_decoder_outputs` as the original has it.

        `T5Config` forces `tie_word_embeddings=True` when it is built (in transformers 5), so a model built from a
        reloaded config ties `lm_head` to `shared` until `from_pretrained` finds both in the checkpoint with
        different values and unties them again. Here the flag is cleared on the config object, so that a model built
        from it in memory (the converter's check) has its own `lm_head`; `scale_decoder_outputs` is restored in case
        a future `T5Config` derives it from the flag.
        """
        scale = config.scale_decoder_outputs
        config.tie_word_embeddings = False
        config.scale_decoder_outputs = scale
        return config

    # -- secrets, drawn on first use -------------------------------------------------------------------------------
    def stack_head_perm(self, stack: str) -> torch.Tensor:
        """The head permutation of every self-attention layer of `stack` (and of its relative bias columns)."""
        if stack not in self._stack_perm:
            self._stack_perm[stack] = self.rng.permutation(self.num_heads)
        return self._stack_perm[stack]

    def t5_attention(self, stack: str, layer: int, cross: bool) -> AttentionTransform:
        """Attention transforms of one layer: per-head rotation, scale and v mixing, heads permuted.

        Self-attention layers take their stack's head permutation (the relative position bias of layer 0 is
        reused by every layer of the stack); cross-attention layers keep the permutation drawn with them.
        """
        key = (stack, layer, cross)
        if key not in self._t5_attn:
            attn = AttentionTransform.draw(self.rng, self.num_heads, self.num_heads, self.head_dim, rope=False)
            if not cross:  # one query head per group: the group and head permutations coincide
                perm = self.stack_head_perm(stack)
                attn = AttentionTransform(attn.qk_rotation, attn.qk_scale, attn.v_mixing, perm, perm)
            self._t5_attn[key] = attn
        return self._t5_attn[key]

    def t5_mlp(self, stack: str, layer: int) -> MLPTransform:
        key = (stack, layer)
        if key not in self._t5_mlp:
            self._t5_mlp[key] = MLPTransform.draw(self.rng, self.config.d_ff, gated=self.gated)
        return self._t5_mlp[key]

    # -- the two passes ----------------------------------------------------------------------------------------------
    def needs_first_pass(self, name: str) -> bool:
        return name.endswith("layer_norm.weight")  # every block norm and both stacks' final_layer_norm

    def transform(self, name, tensor, small):
        if name in _EMBEDDINGS:
            out = {name: self.embedding(tensor)}
            if name == "shared.weight" and "lm_head.weight" not in self.source_names:
                out["lm_head.weight"] = self.head(tensor, small["decoder.final_layer_norm.weight"])
            return out
        if name == "lm_head.weight":
            return {name: self.head(tensor, small["decoder.final_layer_norm.weight"])}
        if _UNUSED.match(name):
            return {}
        w = tensor.to(torch.float64)
        if self.needs_first_pass(name):
            return {name: torch.ones_like(w)}
        match = _BLOCK.match(name)
        if match is None:
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        stack, layer, sub, kind = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        prefix = f"{stack}.block.{layer}.layer."
        ff_sub = 2 if stack == "decoder" else 1
        if sub == 0 and kind.startswith("SelfAttention."):
            return {name: self._attention(name, kind[len("SelfAttention.") :], w, small, stack, layer, cross=False)}
        if stack == "decoder" and sub == 1 and kind.startswith("EncDecAttention."):
            return {name: self._attention(name, kind[len("EncDecAttention.") :], w, small, stack, layer, cross=True)}
        if sub == ff_sub and kind.startswith("DenseReluDense."):
            mlp = self.t5_mlp(stack, layer)
            gamma = small[prefix + f"{ff_sub}.layer_norm.weight"]
            part = kind[len("DenseReluDense.") :]
            if part in ("wi.weight", "wi_0.weight"):
                return {name: mlp.rows(self.input_side(w, gamma))}
            if part == "wi_1.weight":
                return {name: mlp.rows(self.input_side(w, gamma), scaled=True)}
            if part == "wo.weight":
                return {name: self.output_side(mlp.columns(w))}
        raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")

    def _attention(self, name, part, w, small, stack, layer, cross):
        """One tensor of a `T5Attention` (q, k, v, o or the relative bias table)."""
        if part == "relative_attention_bias.weight" and not cross:
            return w[:, self.stack_head_perm(stack)]  # (num_buckets, n_heads): new head h is old head perm[h]
        attn = self.t5_attention(stack, layer, cross)
        if part == "o.weight":
            return self.output_side(attn.output(w))
        if part not in ("q.weight", "k.weight", "v.weight"):
            raise ConversionError(f"no EE transform for tensor {name!r}; this checkpoint has an unexpected layout")
        if cross and part != "q.weight":  # keys and values read the encoder output, through its final norm
            gamma = small["encoder.final_layer_norm.weight"]
        else:
            gamma = small[f"{stack}.block.{layer}.layer.{1 if cross else 0}.layer_norm.weight"]
        read = self.input_side(w, gamma)
        return {"q.weight": attn.query, "k.weight": attn.key, "v.weight": attn.value}[part](read)
