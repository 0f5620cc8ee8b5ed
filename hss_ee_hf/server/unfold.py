"""A server's share of a feature map, unfolded into the patches its convolution stage multiplies (exact: it copies).

See [`hss_ee_hf.transport.geometry`] for why each server may unfold its own share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..transport.geometry import ConvGeometry


def unfold_share(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """`(N, C, H, W)` int64 share -> `(N * H_out * W_out, C * kh * kw)` patches, in `F.unfold(...).transpose(1, 2)`
    order (rows: image, output row, output column; columns: channel, kernel row, kernel column)."""
    g = geometry
    if g.pad_h or g.pad_w:
        x = F.pad(x, (g.pad_w, g.pad_w, g.pad_h, g.pad_h))  # zeros: a share of the zero padding
    n, c = x.shape[:2]
    out_h, out_w = g.out_hw
    s_n, s_c, s_h, s_w = x.stride()
    patches = x.as_strided(
        (n, out_h, out_w, c, g.kernel_h, g.kernel_w),
        (s_n, s_h * g.stride_h, s_w * g.stride_w, s_c, s_h * g.dilation_h, s_w * g.dilation_w),
        x.storage_offset(),
    )
    return patches.reshape(n * out_h * out_w, c * g.kernel_h * g.kernel_w)
