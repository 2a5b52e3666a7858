"""A small configurable ResNet-style backbone (Flax NNX, NHWC).

The paper's nets (ResNet38-d, ScaleNet101, ResNet101/Res2Net101) all keep an output stride of
8 by replacing the last strides with dilations. This backbone does the same at any width and
depth, so the whole pipeline can run on tiny images and CPUs:

* stem: one 3x3 conv (stride ``stem_stride``, default 2) + BN + ReLU, no max-pool, because
  the images it is meant for are small;
* stages: ``blocks[i]`` residual blocks of ``block`` type with ``widths[i]`` output channels;
  the first block of stage i has stride ``strides[i]``; every conv 3x3 of stage i uses
  dilation ``dilations[i]`` (mmseg style: the first block of a dilated stage is dilated too).

With the defaults (stem stride 2, strides (1, 2, 2, 1), dilations (1, 1, 1, 2)) the stage
strides are (2, 4, 8, 8): output stride 8 for the last two stages, as in the paper, where the
segmenter's auxiliary head reads stage 3 at stride 8 too.

Conventions follow torch/mmseg so numbers and recipes carry over: symmetric padding of
``dilation * (k // 2)`` (a stride-2 layer maps H to ceil(H / 2)), BN momentum 0.1 in torch terms
(0.9 in flax terms), epsilon 1e-5, Kaiming-normal (fan-out) conv init. BN statistics are taken
over the whole batch axis of the array it sees; under ``jax.jit`` with a batch sharded over
devices that is the global batch, i.e. synchronised BN, with no ``axis_name`` needed.

Backbone protocol (what heads and the registry rely on): ``__call__(x[B,H,W,3])`` returns a
list of per-stage feature maps, and the attributes ``out_channels`` and ``out_strides`` are
tuples with one entry per stage.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from pmm_jax.models.remat import call_block

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
    """Conv without bias, BatchNorm, optional ReLU (mmseg's ``ConvModule``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        relu: bool = True,
        rngs: nnx.Rngs,
    ):
        pad = dilation * (kernel_size // 2)
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=dilation,
            use_bias=False,
            kernel_init=CONV_INIT,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return jax.nn.relu(x) if self.relu else x


def _shortcut(in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs) -> ConvBN | None:
    """1x1 projection when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return ConvBN(in_channels, out_channels, 1, stride=stride, relu=False, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convs (the first strided, both dilated) plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dilation: int,
                 rngs: nnx.Rngs):
        self.conv1 = ConvBN(in_channels, out_channels, 3, stride=stride, dilation=dilation,
                            rngs=rngs)
        self.conv2 = ConvBN(out_channels, out_channels, 3, dilation=dilation, relu=False,
                            rngs=rngs)
        self.shortcut = _shortcut(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce to ``out_channels // 4``, strided dilated 3x3, 1x1 expand, shortcut, ReLU.

    The stride sits on the 3x3 conv (torchvision v1.5 / mmseg "pytorch" style).
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, dilation: int,
                 rngs: nnx.Rngs):
        mid = max(1, out_channels // self.expansion)
        self.conv1 = ConvBN(in_channels, mid, 1, rngs=rngs)
        self.conv2 = ConvBN(mid, mid, 3, stride=stride, dilation=dilation, rngs=rngs)
        self.conv3 = ConvBN(mid, out_channels, 1, relu=False, rngs=rngs)
        self.shortcut = _shortcut(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _check_config(widths, blocks, strides, dilations, block) -> None:
    """Raises ValueError for per-stage lists of different lengths or an unknown block."""
    lengths = {len(widths), len(blocks), len(strides), len(dilations)}
    if len(lengths) != 1 or not widths:
        raise ValueError(
            "widths, blocks, strides and dilations need one entry per stage (same non-zero "
            f"length); got {list(widths)}, {list(blocks)}, {list(strides)}, {list(dilations)}"
        )
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; choose one of {sorted(BLOCKS)}")


class ResNet(nnx.Module):
    """Configurable ResNet-style backbone; see the module docstring for layout and strides.

    ``remat``: run each block under ``nnx.remat`` (``pmm_jax.models.remat``; config key
    ``model.remat``): less activation memory, same results.

    Attributes:
      out_channels: channels of each stage's feature map (= ``widths``).
      out_strides: input-to-feature stride of each stage.
      frozen_prefixes: () (no stage is frozen).
    """

    def __init__(
        self,
        *,
        stem_width: int = 32,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2, 2),
        strides: Sequence[int] = (1, 2, 2, 1),
        dilations: Sequence[int] = (1, 1, 1, 2),
        block: str = "basic",
        stem_stride: int = 2,
        in_channels: int = 3,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        widths, blocks = tuple(widths), tuple(blocks)
        strides, dilations = tuple(strides), tuple(dilations)
        _check_config(widths, blocks, strides, dilations, block)
        self.stem = ConvBN(in_channels, stem_width, 3, stride=stem_stride, rngs=rngs)
        stages, channels, stride_so_far, out_strides = [], stem_width, stem_stride, []
        for width, depth, stride, dilation in zip(widths, blocks, strides, dilations):
            stages.append(self._stage(BLOCKS[block], channels, width, depth, stride, dilation,
                                      rngs))
            channels, stride_so_far = width, stride_so_far * stride
            out_strides.append(stride_so_far)
        self.stages = nnx.List(stages)
        self.out_channels = widths
        self.out_strides = tuple(out_strides)
        self.frozen_prefixes = ()
        self.remat = remat

    @staticmethod
    def _stage(block_cls, in_channels, width, depth, stride, dilation, rngs) -> nnx.Sequential:
        """``depth`` blocks; only the first one strides and changes the channel count."""
        layers = [block_cls(in_channels, width, stride=stride, dilation=dilation, rngs=rngs)]
        layers += [block_cls(width, width, stride=1, dilation=dilation, rngs=rngs)
                   for _ in range(depth - 1)]
        return nnx.Sequential(*layers)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x[B,H,W,in_channels]`` -> per-stage features ``[B, H/s_i, W/s_i, out_channels[i]]``
        (sizes rounded up)."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            for block in stage.layers:
                x = call_block(block, x, self.remat)
            features.append(x)
        return features
