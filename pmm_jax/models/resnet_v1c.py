"""mmseg's ResNetV1c (Flax NNX, NHWC): the ResNet101 segmentation backbone of the paper.

Layout (mmseg ``ResNetV1c``, ``style="pytorch"``), as in the official PSPNet configs:

* deep stem: three 3x3 conv + BN + ReLU (3 -> stem/2 stride 2, stem/2 -> stem/2,
  stem/2 -> stem), then 3x3 max-pool stride 2 (``deep_stem=False``: torchvision's 7x7
  stride-2 conv instead, so torchvision ImageNet checkpoints load too);
* four stages of bottleneck blocks (1x1 reduce, 3x3 carrying stride and dilation, 1x1 expand
  to 4x; 1x1 strided projection shortcut when the shape changes), ``blocks=(3, 4, 23, 3)``;
* segmentation strides (1, 2, 1, 1) and dilations (1, 1, 2, 4): output stride 8;
* ``contract_dilation`` (mmseg, on in its PSPNet configs): the first block of a stage with
  dilation d > 1 uses d // 2, the others d;
* ``frozen_stages`` (mmseg's meaning; -1 by default, as mmseg's class): 0 freezes the stem,
  k >= 1 the stem and layer1..layerk. Frozen parts get ``FrozenBatchNorm`` (mmseg puts them in
  eval mode: running statistics, never updated) and their attribute names are in
  ``frozen_prefixes``, which the segmenter's optimiser masks (never updated, no weight
  decay). WSSS_MMSeg's ResNetV1c PSPNet base config sets 1 (stem and layer1).

Submodules carry the PyTorch names (mmseg ``stem.{0,1,3,4,6,7}`` or torchvision
``conv1``/``bn1``; ``layerI.J.{conv1,bn1,...,downsample.{0,1}}``), so ``pmm_jax.convert``
maps checkpoints by name (``torch_converter``). Parameter counts (no classifier):
``resnet101`` 42,519,392 with the deep stem (torchvision stem: 42,500,160, torchvision's
resnet101 without its fc); ``resnet50`` 23,527,264 (docs/models.md). Backbone protocol as
in ``pmm_jax.models.resnet``: ``__call__`` returns the four stage features;
``out_channels``, ``out_strides``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from pmm_jax.models.remat import call_block
from pmm_jax.models.resnet import CONV_INIT
from pmm_jax.models.backbone import batch_norm, frozen_stage_prefixes

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         dilation: int = 1, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with torch's symmetric padding ``dilation * (k // 2)``."""
    pad = dilation * (kernel_size // 2)
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                    use_bias=False, kernel_init=CONV_INIT, rngs=rngs)


def bn(channels: int, rngs: nnx.Rngs, frozen: bool = False) -> nnx.Module:
    """BatchNorm with torch's defaults (momentum 0.1, epsilon 1e-5); ``FrozenBatchNorm``
    (running statistics only) in a frozen stage."""
    return batch_norm(channels, frozen=frozen, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1)`` (padding never wins the max)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def make_deep_stem(in_channels: int, width: int, rngs: nnx.Rngs, frozen: bool = False
                   ) -> nnx.List:
    """``[conv, bn, relu] x 3`` (3x3, the first stride 2), indexed as torch's Sequential."""
    half = width // 2
    return nnx.List([conv(in_channels, half, 3, stride=2, rngs=rngs), bn(half, rngs, frozen),
                     jax.nn.relu, conv(half, half, 3, rngs=rngs), bn(half, rngs, frozen),
                     jax.nn.relu, conv(half, width, 3, rngs=rngs), bn(width, rngs, frozen),
                     jax.nn.relu])


def run_sequence(layers, x: jax.Array) -> jax.Array:
    """Applies ``layers`` (modules and plain functions) in order."""
    for layer in layers:
        x = layer(x)
    return x


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (stride, dilation), 1x1 expand to ``4 * planes``; projection shortcut
    ``downsample = [1x1 strided conv, bn]`` when the shape changes; ReLU after the sum.
    ``frozen``: its BN layers are ``FrozenBatchNorm`` (a frozen stage)."""

    def __init__(self, in_channels: int, planes: int, *, stride: int, dilation: int,
                 frozen: bool = False, rngs: nnx.Rngs):
        out_channels = planes * EXPANSION
        self.conv1 = conv(in_channels, planes, 1, rngs=rngs)
        self.bn1 = bn(planes, rngs, frozen)
        self.conv2 = conv(planes, planes, 3, stride=stride, dilation=dilation, rngs=rngs)
        self.bn2 = bn(planes, rngs, frozen)
        self.conv3 = conv(planes, out_channels, 1, rngs=rngs)
        self.bn3 = bn(out_channels, rngs, frozen)
        self.downsample = (nnx.List([conv(in_channels, out_channels, 1, stride=stride, rngs=rngs),
                                     bn(out_channels, rngs, frozen)])
                           if stride != 1 or in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else run_sequence(self.downsample, x)
        return jax.nn.relu(out + identity)


class ResNetV1c(nnx.Module):
    """ResNetV1c backbone; see the module docstring.

    Args:
      depth: 50 or 101 (sets ``blocks`` when that is None).
      blocks: blocks per stage, overriding ``depth`` (tiny test networks).
      base_width: bottleneck planes of stage 1 (64); stage i uses ``base_width * 2**i`` and
        outputs 4x that.
      stem_width: stem output channels (64).
      width_div: divides ``base_width`` and ``stem_width`` (1 = the official network; a
        smaller network for rehearsals and tests).
      deep_stem: mmseg's 3-conv stem (True) or torchvision's 7x7 conv (False).
      frozen_stages: -1 (nothing), 0 (the stem) or k (the stem and layer1..layerk); see the
        module docstring.
      remat: run each block under ``nnx.remat`` (``pmm_jax.models.remat``; config key
        ``model.remat``): less activation memory, same results.
    """

    def __init__(
        self,
        *,
        depth: int = 101,
        blocks: Sequence[int] | None = None,
        base_width: int = 64,
        stem_width: int = 64,
        width_div: int = 1,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        contract_dilation: bool = True,
        deep_stem: bool = True,
        frozen_stages: int = -1,
        in_channels: int = 3,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        if blocks is None:
            if depth not in DEPTHS:
                raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
            blocks = DEPTHS[depth]
        blocks, strides, dilations = tuple(blocks), tuple(strides), tuple(dilations)
        base_width, stem_width = max(1, base_width // width_div), max(2, stem_width // width_div)
        if not len(blocks) == len(strides) == len(dilations) == 4:
            raise ValueError("blocks, strides and dilations need 4 entries (one per stage); "
                             f"got {list(blocks)}, {list(strides)}, {list(dilations)}")
        self.frozen_prefixes = frozen_stage_prefixes(
            ("stem",) if deep_stem else ("conv1", "bn1"),
            [(f"layer{i}",) for i in (1, 2, 3, 4)], frozen_stages)
        if deep_stem:
            self.stem = make_deep_stem(in_channels, stem_width, rngs, frozen_stages >= 0)
        else:
            self.stem = None
            self.conv1 = conv(in_channels, stem_width, 7, stride=2, rngs=rngs)
            self.bn1 = bn(stem_width, rngs, frozen_stages >= 0)
        channels, stride_so_far, out_channels, out_strides = stem_width, 4, [], []
        for i, (depth_i, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            planes = base_width * 2 ** i
            first = dilation // 2 if contract_dilation and dilation > 1 else dilation
            frozen = i + 1 <= frozen_stages
            layer = [Bottleneck(channels, planes, stride=stride, dilation=first, frozen=frozen,
                                rngs=rngs)]
            channels = planes * EXPANSION
            layer += [Bottleneck(channels, planes, stride=1, dilation=dilation, frozen=frozen,
                                 rngs=rngs) for _ in range(depth_i - 1)]
            setattr(self, f"layer{i + 1}", nnx.List(layer))
            stride_so_far *= stride
            out_channels.append(channels)
            out_strides.append(stride_so_far)
        self.out_channels = tuple(out_channels)
        self.out_strides = tuple(out_strides)
        self.remat = remat

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x[B,H,W,3]`` -> the four stage features (strides ``out_strides``)."""
        if self.stem is not None:
            x = run_sequence(self.stem, x)
        else:
            x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = max_pool_3x3_s2(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = call_block(block, x, self.remat)
            features.append(x)
        return features


def resnet101(**kwargs) -> ResNetV1c:
    """ResNetV1c-101 (registry name "resnet101")."""
    return ResNetV1c(depth=101, **kwargs)


def resnet50(**kwargs) -> ResNetV1c:
    """ResNetV1c-50 (registry name "resnet50")."""
    return ResNetV1c(depth=50, **kwargs)


def blocks_per_layer(state_dict: Mapping) -> tuple[int, ...]:
    """Blocks of ``layer1..layer4`` counted from ``layerI.J.`` keys of a PyTorch state dict."""
    return tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")})
                 for i in (1, 2, 3, 4))


def torch_converter(state_dict: Mapping, structure: str | None) -> ResNetV1c:
    """``pmm_jax.convert`` entry: the shape-only ResNetV1c a torchvision / mmseg-v1c state dict
    fills (stem type, depth and widths read from the keys; strides do not change weights)."""
    if structure:
        raise ValueError("--structure is only for scalenet architectures, not resnet")
    deep = "stem.0.weight" in state_dict
    if not deep and "conv1.weight" not in state_dict:
        raise ValueError("not a ResNet state dict: neither mmseg's stem.0.weight nor "
                         "torchvision's conv1.weight is in it")
    stem_width = int(np.shape(state_dict["stem.6.weight" if deep else "conv1.weight"])[0])
    base_width = int(np.shape(state_dict.get("layer1.0.conv1.weight", (64,)))[0])
    return nnx.eval_shape(lambda: ResNetV1c(
        blocks=blocks_per_layer(state_dict), base_width=base_width, stem_width=stem_width,
        deep_stem=deep, rngs=nnx.Rngs(0)))

