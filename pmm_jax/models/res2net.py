"""Res2Net-v1b (Flax NNX, NHWC): the paper's best segmentation backbone, Res2Net101-v1b-26w-4s.

Layout of the official Res2Net v1b code, as the WSSS_MMSeg fork uses it for PSPNet:

* deep stem ``conv1``: 3x3 convs 3 -> stem/2 (stride 2) -> stem/2 -> stem with BN + ReLU
  between them, then ``bn1`` + ReLU and a 3x3 max-pool stride 2;
* Bottle2neck blocks: 1x1 conv to ``scale`` groups of ``w = floor(planes * base_width / 64)``
  channels; groups 0..scale-2 each pass a 3x3 conv + BN + ReLU (carrying stride and
  dilation); in a normal block group i first adds the previous group's output (the
  hierarchical residual), in the first block of a stage it does not, and its last group is
  3x3 average-pooled (stride, padding 1, zero padding counted) instead of passed through;
  then 1x1 conv to ``4 * planes`` + BN, plus the shortcut, ReLU;
* shortcut when the shape changes (``downsample``): average pool (kernel = stride = the
  block's stride, ceil mode, padding not counted; identity at stride 1), 1x1 conv, BN;
* every block of a dilated stage uses its full dilation (no contraction, unlike ResNetV1c);
* ``frozen_stages`` as ResNetV1c's (-1 by default: the official Res2Net has no such option and
  WSSS_MMSeg trains every stage): 0 freezes the stem (``conv1``, ``bn1``), k also
  layer1..layerk, with ``FrozenBatchNorm`` there and their names in ``frozen_prefixes``.

Submodules carry the official / timm PyTorch names (``conv1.{0,1,3,4,6}``, ``bn1``,
``layerI.J.{conv1,bn1,convs.K,bns.K,conv3,bn3,downsample.{1,2}}``) for ``pmm_jax.convert``.
Parameter count of ``res2net101``: 43,176,920 (no classifier; docs/models.md).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.models.remat import call_block
from pmm_jax.models.backbone import frozen_stage_prefixes
from pmm_jax.models.resnet_v1c import (EXPANSION, blocks_per_layer, bn, conv, max_pool_3x3_s2,
                                       run_sequence)


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """torch ``AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)``."""
    if stride == 1:
        return x
    pad_h, pad_w = (-x.shape[1]) % stride, (-x.shape[2]) % stride
    return nnx.avg_pool(x, (stride, stride), strides=(stride, stride),
                        padding=((0, pad_h), (0, pad_w)), count_include_pad=False)


class Bottle2neck(nnx.Module):
    """Res2Net bottleneck with ``scale`` hierarchical groups; see the module docstring."""

    def __init__(self, in_channels: int, planes: int, *, stride: int, dilation: int,
                 first: bool, base_width: int, scale: int, frozen: bool = False,
                 rngs: nnx.Rngs):
        if scale < 2:
            raise ValueError(f"scale must be >= 2, got {scale}")
        width = planes * base_width // 64
        out_channels = planes * EXPANSION
        self.first, self.stride = first, stride
        self.conv1 = conv(in_channels, width * scale, 1, rngs=rngs)
        self.bn1 = bn(width * scale, rngs, frozen)
        self.convs = nnx.List([conv(width, width, 3, stride=stride, dilation=dilation, rngs=rngs)
                               for _ in range(scale - 1)])
        self.bns = nnx.List([bn(width, rngs, frozen) for _ in range(scale - 1)])
        self.conv3 = conv(width * scale, out_channels, 1, rngs=rngs)
        self.bn3 = bn(out_channels, rngs, frozen)
        self.downsample = (nnx.List([functools.partial(avg_pool_ceil, stride=stride),
                                     conv(in_channels, out_channels, 1, rngs=rngs),
                                     bn(out_channels, rngs, frozen)])
                           if stride != 1 or in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        groups = jnp.split(out, len(self.convs) + 1, axis=-1)
        outs = []
        for i, (conv_i, bn_i) in enumerate(zip(self.convs, self.bns)):
            sp = groups[i] if i == 0 or self.first else outs[-1] + groups[i]
            outs.append(jax.nn.relu(bn_i(conv_i(sp))))
        last = groups[-1]
        if self.first:
            last = nnx.avg_pool(last, (3, 3), strides=(self.stride, self.stride),
                                padding=((1, 1), (1, 1)), count_include_pad=True)
        out = self.bn3(self.conv3(jnp.concatenate([*outs, last], axis=-1)))
        identity = x if self.downsample is None else run_sequence(self.downsample, x)
        return jax.nn.relu(out + identity)


class Res2Net(nnx.Module):
    """Res2Net-v1b backbone; see the module docstring.

    Args:
      blocks: blocks per stage ((3, 4, 23, 3) for 101 layers).
      planes: bottleneck planes per stage (64, 128, 256, 512); stage outputs are 4x.
      base_width, scale: 26 and 4 ("26w_4s").
      stem_width: stem output channels (64).
      width_div: divides ``planes`` and ``stem_width`` (1 = the official network; a smaller
        network for rehearsals and tests, e.g. ``--config.seg.model.backbone.width_div=16``).
      frozen_stages: -1 (nothing), 0 (the stem) or k (the stem and layer1..layerk).
      remat: run each block under ``nnx.remat`` (``pmm_jax.models.remat``; config key
        ``model.remat``): less activation memory, same results.
    """

    def __init__(
        self,
        *,
        blocks: Sequence[int] = (3, 4, 23, 3),
        planes: Sequence[int] = (64, 128, 256, 512),
        base_width: int = 26,
        scale: int = 4,
        stem_width: int = 64,
        width_div: int = 1,
        strides: Sequence[int] = (1, 2, 1, 1),
        dilations: Sequence[int] = (1, 1, 2, 4),
        frozen_stages: int = -1,
        in_channels: int = 3,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        blocks = tuple(blocks)
        planes = tuple(max(1, p // width_div) for p in planes)
        stem_width = max(2, stem_width // width_div)
        strides, dilations = tuple(strides), tuple(dilations)
        if not len(blocks) == len(planes) == len(strides) == len(dilations) == 4:
            raise ValueError("blocks, planes, strides and dilations need 4 entries; got "
                             f"{list(blocks)}, {list(planes)}, {list(strides)}, {list(dilations)}")
        self.frozen_prefixes = frozen_stage_prefixes(
            ("conv1", "bn1"), [(f"layer{i}",) for i in (1, 2, 3, 4)], frozen_stages)
        half, stem_frozen = stem_width // 2, frozen_stages >= 0
        self.conv1 = nnx.List([conv(in_channels, half, 3, stride=2, rngs=rngs),
                               bn(half, rngs, stem_frozen), jax.nn.relu,
                               conv(half, half, 3, rngs=rngs), bn(half, rngs, stem_frozen),
                               jax.nn.relu, conv(half, stem_width, 3, rngs=rngs)])
        self.bn1 = bn(stem_width, rngs, stem_frozen)
        channels, stride_so_far, out_strides = stem_width, 4, []
        for i, (depth, plane, stride, dilation) in enumerate(zip(blocks, planes, strides,
                                                                 dilations)):
            block_args = dict(base_width=base_width, scale=scale, frozen=i + 1 <= frozen_stages,
                              dilation=dilation, rngs=rngs)
            layer = [Bottle2neck(channels, plane, stride=stride, first=True, **block_args)]
            channels = plane * EXPANSION
            layer += [Bottle2neck(channels, plane, stride=1, first=False, **block_args)
                      for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nnx.List(layer))
            stride_so_far *= stride
            out_strides.append(stride_so_far)
        self.out_channels = tuple(p * EXPANSION for p in planes)
        self.out_strides = tuple(out_strides)
        self.remat = remat

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x[B,H,W,3]`` -> the four stage features (strides ``out_strides``)."""
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(run_sequence(self.conv1, x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = call_block(block, x, self.remat)
            features.append(x)
        return features


def res2net101(**kwargs) -> Res2Net:
    """Res2Net101-v1b-26w-4s (registry name "res2net101")."""
    return Res2Net(**kwargs)


def torch_converter(state_dict: Mapping, structure: str | None) -> Res2Net:
    """``pmm_jax.convert`` entry: the shape-only Res2Net-v1b an official / timm state dict
    fills (depth, planes, width and scale read from the keys)."""
    if structure:
        raise ValueError("--structure is only for scalenet architectures, not res2net")
    if "conv1.0.weight" not in state_dict or "layer1.0.convs.0.weight" not in state_dict:
        raise ValueError("not a Res2Net-v1b state dict: conv1.0.weight or "
                         "layer1.0.convs.0.weight is missing")
    planes = tuple(int(np.shape(state_dict[f"layer{i}.0.conv3.weight"])[0]) // EXPANSION
                   for i in (1, 2, 3, 4))
    width = int(np.shape(state_dict["layer1.0.convs.0.weight"])[0])
    scale = 1 + len({k.split(".")[3] for k in state_dict if k.startswith("layer1.0.convs.")})
    return nnx.eval_shape(lambda: Res2Net(
        blocks=blocks_per_layer(state_dict), planes=planes,
        base_width=math.ceil(width * 64 / planes[0]), scale=scale,
        stem_width=int(np.shape(state_dict["bn1.weight"])[0]), rngs=nnx.Rngs(0)))
