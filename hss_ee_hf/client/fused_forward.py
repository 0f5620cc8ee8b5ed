"""The two-stages-per-layer schedule on the client: decoder layers whose round trips carry the residual too.

With `stages_per_layer=2` the client still runs HF's own attention (RoPE, cache, attention kernels) and MLP modules,
but each decoder layer's `forward` is replaced by [`fused_layer_forward`], which orders the round trips so that

* `o` (attention output) travels together with the residual and returns the MLP's gate/up input times `σ(r')`
  (stage `layers.i.o_up`), and
* `down` travels with the updated residual and returns the *next* layer's q/k/v input times `σ(r'')`
  (stage `layers.i.down_qkv`).

The client divides by `σ` (the norm's per-row scale, computed from its own plaintext residual) and hands the result
to the q/k/v or gate/up modules through [`FusedStage.preset`], so they take it instead of calling the servers. A
norm's output is never shared: the stages take `r + b` (the residual plus the first product's bias), and the fused
weights (built by the servers, `artifacts.fused`) fold the norm's mean subtraction for LayerNorm. Layer 0's q/k/v,
the last layer's `down` and `lm_head` stay ordinary stages: `2·layers + 2` round trips per token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..artifacts.fused import two_stage_layout
from ..errors import CheckpointError, ScheduleUnavailableError
from .remote_layers import RemoteLinear
from .stage_client import StageClient


@dataclass(frozen=True)
class _FamilyNames:
    """Where a family keeps the modules the fused forward needs (attributes of a decoder layer)."""

    attn: str
    qkv: str  # first q/k/v module of the attention (its FusedStage carries all parts)
    o: str
    norm1: str
    norm2: str
    up: str  # first gate/up module of the MLP
    down: str
    centered: bool  # LayerNorm (mean subtraction) rather than RMSNorm
    positional: tuple[str, ...] = ()  # names of the arguments the HF model passes to a layer by position


_NAMES = {
    "llama": _FamilyNames(
        "self_attn",
        "q_proj",
        "o_proj",
        "input_layernorm",
        "post_attention_layernorm",
        "gate_proj",
        "down_proj",
        centered=False,
    ),  # fmt: skip
    "gpt2": _FamilyNames(
        "attn",
        "c_attn",
        "c_proj",
        "ln_1",
        "ln_2",
        "c_fc",
        "c_proj",
        centered=True,
        positional=("cache", "attention_mask", "encoder_hidden_states"),
    ),  # fmt: skip
}


class _ScheduleState:
    """What one decoder layer leaves for the next inside a forward pass."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None  # the residual the next fused stage carries
        self.raw: torch.Tensor | None = None  # fused block output, still times σ
        self.pending_for: torch.Tensor | None = None  # the hidden state whose q/k/v input is ready
        self.pending: tuple[torch.Tensor, ...] = ()
        self.next_widths: list[int] = []  # the q/k/v parts' widths (the same in every layer)


class FusedOutput(nn.Module):
    """Stands in for `o_proj` / `down_proj` under the two-stage schedule.

    It sends `[x, r + b]` to a fused stage, returns the first block (`x @ W.T + b`, for the residual) and leaves the
    fused block (the next norm's input times `σ`) in the shared state.

    Args:
        client (`StageClient`): runs the stage.
        state (`_ScheduleState`): shared by the layers of one model.
        stage (`str`): fused stage name.
        out_features (`int`): width of the first block (the hidden size).
        bias (`torch.Tensor`, *optional*): the replaced module's client-held bias.
    """

    def __init__(self, client: StageClient, state: _ScheduleState, stage: str, out_features: int, bias):
        super().__init__()
        self.client, self.state, self.stage, self.out_features = client, state, stage, out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.state.residual
        if r is None:
            raise RuntimeError(f"{self.stage} was called outside its decoder layer's fused forward")
        carried = r + self.bias if self.bias is not None else r  # W2·(r + b) is the norm input's share of b
        y = self.client.run(self.stage, torch.cat([x, carried.to(x.dtype)], dim=-1))
        first, self.state.raw = y[..., : self.out_features], y[..., self.out_features :]
        return first + self.bias if self.bias is not None else first

    def extra_repr(self) -> str:
        return f"stage={self.stage!r}, out={self.out_features}"


def _inverse_sigma(norm: nn.Module, r: torch.Tensor, centered: bool) -> torch.Tensor:
    """`1/σ(r)` as HF's norm computes it (float32): `norm(r) = C·r · (1/σ(r))` once its gain is folded."""
    x = r.to(torch.float32)
    if centered:
        x = x - x.mean(-1, keepdim=True)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def fused_layer_forward(
    layer: nn.Module, names: _FamilyNames, state: _ScheduleState, hidden_states: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    """A decoder layer's forward under the two-stage schedule (replaces `LlamaDecoderLayer.forward` and the like).

    Args:
        layer (`nn.Module`): the HF decoder layer (its attention, norms and MLP are used as they are).
        names (`_FamilyNames`): where its modules are.
        state (`_ScheduleState`): what the previous layer left (this layer's q/k/v input).
        hidden_states (`torch.Tensor`): the residual stream `r`.
        args, kwargs: what HF's model passes to the layer (mask, position embeddings, cache, ...), passed to its
            attention by name.

    Returns:
        `torch.Tensor`: the residual after the layer.
    """
    kwargs.update(zip(names.positional, args, strict=False))
    if kwargs.pop("encoder_hidden_states", None) is not None:
        raise ScheduleUnavailableError("cross-attention layers have no two-stage schedule; use stages_per_layer=4")
    kwargs.pop("encoder_attention_mask", None)
    attn, mlp = getattr(layer, names.attn), layer.mlp
    r = hidden_states
    if state.pending_for is r:  # q/k/v input came back with the previous layer's `down`
        key = r
        getattr(attn, names.qkv).fused.preset(key, state.pending)
    else:  # first layer: the ordinary `qkv` stage on the norm's output
        key = getattr(layer, names.norm1)(r)
    state.pending_for, state.pending = None, ()
    state.residual, state.raw = r, None
    o = attn(key, **kwargs)[0]
    r1 = r + o
    gate_up = getattr(mlp, names.up).fused
    gate_up.preset(r1, (state.raw * _inverse_sigma(getattr(layer, names.norm2), r1, names.centered)).split(
        gate_up.widths, dim=-1
    ))  # fmt: skip
    state.residual, state.raw = r1, None
    r2 = r1 + mlp(r1)
    if state.raw is not None:  # a fused `down`: the next layer's q/k/v input
        inv = _inverse_sigma(getattr(layer, names.norm1), r2, names.centered)  # next layer's norm1: same eps
        state.pending_for, state.pending = r2, (state.raw * inv).split(state.next_widths, dim=-1)
    state.residual = state.raw = None
    return r2


def register_fused_stages(client: StageClient, config, infos) -> None:
    """Adds the fused stages' widths and scales (from both servers' `Describe`, which must agree) to a stage client.

    Args:
        client (`StageClient`): the model's stage client.
        config (`PretrainedConfig`): the model's config.
        infos (`tuple[dict, dict]`): both servers' `describe()` answers.

    Raises:
        `ScheduleUnavailableError`: a server does not offer the schedule, or the two disagree on a fused stage.
    """
    for info in infos:
        if 2 not in info.get("schedules", (4,)):
            raise ScheduleUnavailableError(
                f"share server {info['endpoint']} offers stages_per_layer {tuple(info.get('schedules', (4,)))}, "
                "not 2; start both servers with `hss-ee serve --schedules 4,2` or use stages_per_layer=4"
            )
    for fused in two_stage_layout(config):
        scales = [info["scales"].get(fused.name) for info in infos]
        # Scales come from untrusted servers: two non-colluding ones must send the same, or neither is believed.
        if scales[0] is None or scales[1] is None or not torch.equal(scales[0], scales[1]):
            raise ScheduleUnavailableError(
                f"the two servers disagree on (or lack) the scales of fused stage {fused.name}; they must serve "
                "the same checkpoint with the same hss-ee-hf version"
            )
        client.scales[fused.name] = scales[0].to(torch.float64)
        client.in_features[fused.name] = infos[0]["stages"][fused.name][0]


def patch_layers(model: nn.Module, family: str, client: StageClient) -> None:
    """Switches a client model's decoder layers to the two-stage forward (after [`register_fused_stages`]).

    Args:
        model (`PreTrainedModel`): the client model, its linear layers already swapped for [`RemoteLinear`]s.
        family (`str`): `"llama"` or `"gpt2"`.
        client (`StageClient`): its stage client.

    Raises:
        `CheckpointError`: the norms still carry a gain or bias (the checkpoint was not converted by hss-ee).
    """
    names = _NAMES[family]
    layers = model.get_decoder().layers if family == "llama" else model.transformer.h
    state = _ScheduleState()
    for i, layer in enumerate(layers):
        for norm_name in (names.norm1, names.norm2):
            norm = getattr(layer, norm_name)
            bias = getattr(norm, "bias", None)
            if not bool((norm.weight == 1).all()) or (bias is not None and bool(bias.any())):
                raise CheckpointError(
                    f"layer {i}'s {norm_name} still has a gain or bias: the two-stage schedule needs norms folded "
                    "into the weights, as `hss-ee convert` does; convert the model again"
                )
        attn, mlp = getattr(layer, names.attn), layer.mlp
        o: RemoteLinear = getattr(attn, names.o)
        setattr(attn, names.o, FusedOutput(client, state, f"layers.{i}.o_up", o.out_features, o.bias))
        if i + 1 < len(layers):
            down: RemoteLinear = getattr(mlp, names.down)
            setattr(mlp, names.down, FusedOutput(client, state, f"layers.{i}.down_qkv", down.out_features, down.bias))
    state.next_widths = getattr(getattr(layers[0], names.attn), names.qkv).fused.widths
    for layer in layers:
        layer.forward = functools.partial(fused_layer_forward, layer, names, state)
