"""A convolution's geometry on the wire: the servers unfold feature maps themselves (DESIGN.md §3, §8).

A convolution is one matrix product over im2col patches. Unfolding is linear and only copies (and zero-pads)
elements, so each server can unfold its own share of the feature map exactly: the client sends the `(C, H, W)` map
(9x fewer bytes than the patches of a 3x3 convolution) with this geometry, and each server builds the patches in the
order of `weight.reshape(out, -1)` (channel, kernel row, kernel column), rows in `(image, output row, output column)`
order, as `torch.nn.functional.unfold(...).transpose(1, 2)` gives them. Zero padding added to a share is a share of
zero padding. The architecture is public (it is in the checkpoint's `config.json`), so the geometry reveals nothing.

On the data plane a STAGE frame with flag `INPUT_MAP_SHARE` or `INPUT_MAP_SEED` carries this 48-byte geometry before
the share (or seed); `rows` counts images. gRPC has no such request: the client unfolds for it, as before.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

GEOMETRY = struct.Struct("<12I")  # the eleven fields below and a zero word: 48 bytes keep the share 8-byte aligned
GEOMETRY_BYTES = GEOMETRY.size
_MAX_SIDE = 1 << 16


@dataclass(frozen=True)
class ConvGeometry:
    """What a server needs to unfold one image's `(channels, height, width)` share into patches."""

    channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    dilation_h: int = 1
    dilation_w: int = 1

    @classmethod
    def of(cls, conv, height: int, width: int) -> ConvGeometry:
        """The geometry of an `nn.Conv2d`-like module (explicit zero padding) on a `height x width` input."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        return cls(conv.in_channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw)

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output height and width (as `nn.Conv2d` computes them)."""
        out_h = (self.height + 2 * self.pad_h - self.dilation_h * (self.kernel_h - 1) - 1) // self.stride_h + 1
        out_w = (self.width + 2 * self.pad_w - self.dilation_w * (self.kernel_w - 1) - 1) // self.stride_w + 1
        return out_h, out_w

    @property
    def patch_features(self) -> int:
        """Elements of one patch: the stage's `in_features`."""
        return self.channels * self.kernel_h * self.kernel_w

    @property
    def map_elements(self) -> int:
        """Elements of one image's feature map."""
        return self.channels * self.height * self.width

    @property
    def patches(self) -> int:
        """Patches (output positions) per image."""
        out_h, out_w = self.out_hw
        return out_h * out_w

    def pack(self) -> bytes:
        return GEOMETRY.pack(*astuple(self), 0)

    @classmethod
    def unpack(cls, data) -> ConvGeometry:
        """Reads and checks a packed geometry.

        Raises:
            `ValueError`: it is malformed or describes no valid convolution.
        """
        if len(data) != GEOMETRY_BYTES:
            raise ValueError(f"a convolution geometry is {GEOMETRY_BYTES} bytes, got {len(data)}")
        *fields, reserved = GEOMETRY.unpack(data)
        if reserved:
            raise ValueError("the geometry's reserved word is not zero")
        geometry = cls(*fields)
        geometry.check()
        return geometry

    def check(self, in_features: int | None = None) -> None:
        """Raises `ValueError` unless this is a convolution a server can unfold (for a stage of `in_features`)."""
        sides = (self.channels, self.height, self.width, self.kernel_h, self.kernel_w, self.stride_h, self.stride_w,
                 self.dilation_h, self.dilation_w)  # fmt: skip
        if min(sides) < 1 or max(sides) > _MAX_SIDE or min(self.pad_h, self.pad_w) < 0:
            raise ValueError(f"sizes, kernel, stride and dilation must be 1..{_MAX_SIDE} and padding >= 0: {self}")
        if self.pad_h >= self.dilation_h * self.kernel_h or self.pad_w >= self.dilation_w * self.kernel_w:
            raise ValueError(f"padding must be smaller than the dilated kernel: {self}")
        if min(self.out_hw) < 1:
            raise ValueError(f"the kernel does not fit the padded {self.height}x{self.width} input: {self}")
        if in_features is not None and self.patch_features != in_features:
            raise ValueError(
                f"a {self.channels}-channel {self.kernel_h}x{self.kernel_w} kernel makes patches of "
                f"{self.patch_features} elements, the stage takes {in_features}"
            )
