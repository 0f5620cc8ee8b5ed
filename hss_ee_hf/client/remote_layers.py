"""Client-side modules that stand in for HF's weight-bearing layers (DESIGN.md §3).

The client keeps the HF model's own attention, norms, cache and generation code. Only the linear
layers are swapped: [`RemoteLinear`] sends its input to a stage on the share servers (parts of one
stage, like q, k and v, share a single round trip through [`FusedStage`]), [`PermutedEmbedding`]
maps original token ids through the key before looking up the EE table, and [`UnpermutedHead`]
puts the EE logits back into the original vocabulary order.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..transport.geometry import ConvGeometry
from .stage_client import StageClient


class FusedStage:
    """One stage whose output is split among several HF modules (q/k/v, gate/up).

    The first module called with an input runs the stage; the others called with the very same
    input tensor take their slice of that result instead of another round trip.

    Thread safety: one client model may serve many threads at once (a web app, the gateway). The input and parts
    in flight are kept per thread, because the q, k and v of one forward pass are always called by the thread that
    runs that pass, while another thread's pass may reach the same stage in between.
    """

    def __init__(self, client: StageClient, stage: str, widths: list[int]):
        self.client, self.stage, self.widths = client, stage, widths
        self._local = threading.local()  # .input, .parts, .pending of the pass this thread is running

    def preset(self, x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> None:
        """Makes the parts' next call with the very tensor `x` return `parts` without a round trip: the two-stage
        schedule computed this stage's output in an earlier, fused round trip."""
        state = self._local
        state.input, state.parts, state.pending = x, tuple(parts), set(range(len(self.widths)))

    def output(self, part: int, x: torch.Tensor) -> torch.Tensor:
        state = self._local
        pending = getattr(state, "pending", None)
        if pending is None or x is not state.input or part not in pending:
            state.parts = self.client.run(self.stage, x).split(self.widths, dim=-1)
            pending = set(range(len(self.widths)))
            state.input, state.pending = x, pending
        pending.discard(part)
        out = state.parts[part]
        if not pending:  # every part consumed: drop references to the activations
            state.input, state.parts, state.pending = None, (), None
        return out


class RemoteLinear(nn.Module):
    """A linear layer whose product runs on the share servers; the bias (if any) is added here.

    Args:
        fused (`FusedStage`): the stage this layer is a part of.
        part (`int`): which slice of the stage output is this layer's.
        in_features (`int`): input width.
        out_features (`int`): output width.
        bias (`torch.Tensor`, *optional*): the client-held bias.
    """

    def __init__(self, fused: FusedStage, part: int, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.fused, self.part = fused, part
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        _add_dtype_placeholder(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.output(self.part, x)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"stage={self.fused.stage!r}, part={self.part}, in={self.in_features}, out={self.out_features}"


def _add_dtype_placeholder(module: nn.Module) -> None:
    """An empty `weight` that follows `.to(dtype)`: some HF forwards read `layer.weight.dtype` (T5's FFN, ViT's
    pixel cast) to pick the activation dtype. The weight itself is on the servers."""
    module.register_buffer("weight", torch.empty(0, dtype=torch.float32), persistent=False)


class RemoteConv2d(nn.Module):
    """A convolution computed on the share servers as one matrix product over im2col patches.

    On a transport that carries feature maps (the data plane, in-process) the client shares the `(N, C, H, W)` input
    itself and each server unfolds its share into `(N * L, C_in * kh * kw)` patches in the order of
    `weight.reshape(out, -1)` (`hss_ee_hf/transport/geometry.py`): 9x fewer bytes for a 3x3 convolution. Otherwise
    (gRPC, `verify=True`, a stage shared by several convolutions) the client unfolds the patches and shares those.
    The servers multiply them by the flattened EE kernel like any linear stage, and the client folds the result
    back into `(N, C_out, H_out, W_out)` and adds the bias.

    Args:
        fused (`FusedStage`): the stage this convolution is.
        part (`int`): which slice of the stage output is this convolution's.
        conv (`nn.Conv2d`): the module replaced (its geometry; its weight may be on the meta device).
        bias (`torch.Tensor`, *optional*): the client-held bias.
    """

    def __init__(self, fused: FusedStage, part: int, conv: nn.Conv2d, bias: torch.Tensor | None):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"only ungrouped, zero-padded convolutions with explicit padding can run remotely; got groups="
                f"{conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        self.fused, self.part = fused, part
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        _add_dtype_placeholder(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        geometry = ConvGeometry.of(self, h, w)
        out_hw = geometry.out_hw
        y = None
        if len(self.fused.widths) == 1:  # the servers unfold the feature map when the transport can carry it
            y = self.fused.client.run_map(self.fused.stage, x, geometry)
        if y is None:
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
            y = self.fused.output(self.part, cols.transpose(1, 2))  # (N, L, C_out)
        y = (
            y.reshape(n, out_hw[0] * out_hw[1], self.out_channels)
            .transpose(1, 2)
            .reshape(n, self.out_channels, *out_hw)
        )
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"stage={self.fused.stage!r}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class PermutedEmbedding(nn.Embedding):
    """The EE embedding table, looked up with original token ids mapped through the key's `pi`."""

    def __init__(self, table: torch.Tensor, vocab_perm: torch.Tensor):
        super().__init__(table.shape[0], table.shape[1], _weight=table, _freeze=True)
        self.register_buffer("vocab_perm", vocab_perm.to(torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(self.vocab_perm[input_ids])


class UnpermutedHead(nn.Module):
    """The remote lm_head or classifier; returns logits in the original vocabulary or label order (`[..., pi]`)."""

    def __init__(self, remote: RemoteLinear, vocab_perm: torch.Tensor):
        super().__init__()
        self.remote = remote
        self.register_buffer("vocab_perm", vocab_perm.to(torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.remote(x)[..., self.vocab_perm]
