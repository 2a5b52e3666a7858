"""ScaleNet (Li et al., "Data-driven neuron allocation for scale aggregation networks"), the
CAM backbone of PMM's best result, as PMM's ``network/scalenet.py`` defines it. NHWC.

Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (padding 1). Four layers of scale-aggregation
blocks (SABlock; ScaleNet101: 3, 4, 23, 3 blocks, planes 64, 128, 256, 512, expansion 4);
only layer2 has stride 2, so the output stride is 8. A block with stride s first max-pools
its input s x s (not a strided conv); its shortcut is a 1x1 conv + BN when the shape changes.

SABlock: 1x1 conv + BN + ReLU to ``planes``, then four branches at scales 1, 2, 4, 7: branch
i max-pools by its scale (a global pool when the map is smaller than the scale), convolves
to ``structure[block][i]`` channels (3x3, dilated, when ``side / 2**i > 1``, else 1x1; no
branch when the count is 0), is upsampled back (nearest when the size divides, else
bilinear, align_corners False) and batch-normalised; the concatenation goes through ReLU,
1x1 conv + BN to ``4 * planes``, the shortcut is added, ReLU. The per-block branch widths and
the ImageNet feature side come from the published structure json (a list, one
``[c1, c2, c4, c7, side]`` per block), read from a file path.

Module names follow the PyTorch ones (``conv1``, ``bn1``, ``layer1.0.conv2.3``,
``layer2.0.downsample.1``, ...), so ``pmm_jax.convert`` maps state-dict keys by name. By
default (``norm="frozen"``) all BN is in inference mode (``FrozenBatchNorm``), as in PMM's
classifier training; ``frozen_prefixes`` names the parameters it never trains (default
``frozen_stages=1``: conv1, bn1, layer1). WSSS_MMSeg's segmentation ScaleNet
(``mmseg/models/backbones/scalenet.py``) trains everything with SyncBN (``norm_eval=False``,
no frozen stages) and dilations (1, 1, 2, 4): ``norm="batch", frozen_stages=-1``, which
``pmm_jax.models.build_segmenter`` fills in by default. Frozen stages always get
``FrozenBatchNorm``.

Features (backbone protocol): the outputs of layer1..layer4 (SEAM's PCM reads layer2 and
layer3), strides (4, 8, 8, 8), channels (256, 512, 1024, 2048) / ``width_div``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pmm_jax.models.remat import call_block
from pmm_jax.models.backbone import (batch_norm, check_norm, conv, conv_init,
                                     frozen_stage_prefixes)

SCALES = (1, 2, 4, 7)
EXPANSION = 4


def load_structure(structure: str | Sequence) -> list[list[int]]:
    """The structure list from a json file path (or the list itself); checks its shape."""
    if isinstance(structure, (str, os.PathLike)):
        with open(structure) as f:
            structure = json.load(f)
    structure = [list(map(int, entry)) for entry in structure]
    bad = [i for i, entry in enumerate(structure) if len(entry) != len(SCALES) + 1]
    if bad:
        raise ValueError(f"ScaleNet structure entries need {len(SCALES) + 1} numbers "
                         f"(4 branch widths and the side); entries {bad[:10]} do not")
    return structure


def max_pool(x: jax.Array, size: int) -> jax.Array:
    """torch ``max_pool2d(x, size, size)`` (floor mode) on NHWC."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1),
                                 (1, size, size, 1), "VALID")


def scale_pool(x: jax.Array, scale: int) -> jax.Array:
    """A branch's pooling: ``scale`` x ``scale`` max-pool, or when the map is smaller than the
    scale the official ``max_pool2d(x, H, W)`` (an H x H window at the origin: the global
    maximum for square maps; the whole map when W < H, where PyTorch would fail)."""
    h, w = x.shape[1:3]
    if h >= scale and w >= scale:
        return max_pool(x, scale)
    window = x[:, :h, :h] if h <= w else x
    return jnp.max(window, axis=(1, 2), keepdims=True)


def upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Back to ``size``: nearest when both sides divide (a repeat), else bilinear
    (align_corners False, like ``F.upsample``)."""
    h, w = x.shape[1:3]
    if size[0] % h == 0 and size[1] % w == 0:
        return jnp.repeat(jnp.repeat(x, size[0] // h, axis=1), size[1] // w, axis=2)
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear")


class SABlock(nnx.Module):
    """Scale-aggregation bottleneck; see the module docstring."""

    def __init__(self, in_channels: int, planes: int, entry: Sequence[int], *, stride: int,
                 dilation: int, frozen_bn: bool = True, rngs: nnx.Rngs):
        widths, side = entry[:-1], entry[-1]
        out = planes * EXPANSION
        self.stride = stride
        norm = lambda c: batch_norm(c, frozen=frozen_bn, rngs=rngs)
        self.downsample = (nnx.List([conv(in_channels, out, 1, rngs=rngs), norm(out)])
                           if stride != 1 or in_channels != out else None)
        self.conv1 = conv(in_channels, planes, 1, rngs=rngs)
        self.bn1 = norm(planes)
        big = [side / 2 ** i > 1 for i in range(len(SCALES))]
        self.conv2 = nnx.List([
            conv(planes, c, 3 if big[i] else 1, dilation=dilation if big[i] else 1, rngs=rngs)
            if c > 0 else None for i, c in enumerate(widths)])
        self.bn2 = nnx.List([norm(c) if c > 0 else None for c in widths])
        self.conv3 = conv(sum(widths), out, 1, rngs=rngs)
        self.bn3 = norm(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride > 1:
            x = max_pool(x, self.stride)
        residual = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        out1 = jax.nn.relu(self.bn1(self.conv1(x)))
        size = out1.shape[1:3]
        branches = []
        for scale, conv2, bn2 in zip(SCALES, self.conv2, self.bn2):
            if conv2 is None:
                continue
            y = conv2(out1 if scale == 1 else scale_pool(out1, scale))
            branches.append(bn2(y if scale == 1 else upsample(y, size)))
        out = self.bn3(self.conv3(jax.nn.relu(jnp.concatenate(branches, axis=-1))))
        return jax.nn.relu(out + residual)


class ScaleNet(nnx.Module):
    """ScaleNet backbone (see the module docstring).

    Args:
      structure: path of the structure json, or the list itself; one entry per block.
      layers: blocks per layer (ScaleNet101: (3, 4, 23, 3)); must sum to len(structure).
      dilations: dilation of the 3x3 branch convs of each layer.
      width_div: divides the stem and plane widths (tests; the branch widths come from
        ``structure``).
      norm: "frozen" (BN on running statistics; the classifier) or "batch" (trainable
        BatchNorm; the segmenter).
      frozen_stages: mmseg's meaning: -1 nothing, 0 the stem (conv1, bn1), k the stem and
        layer1..layerk (default 1, PMM's classifier).
      remat: run each block under ``nnx.remat`` (``pmm_jax.models.remat``; config key
        ``model.remat``): less activation memory, same results.
    """

    def __init__(self, *, structure: str | Sequence, layers: Sequence[int] = (3, 4, 23, 3),
                 dilations: Sequence[int] = (1, 1, 1, 1), width_div: int = 1,
                 norm: str = "frozen", frozen_stages: int = 1, in_channels: int = 3,
                 remat: bool = False, rngs: nnx.Rngs):
        check_norm(norm)
        self.frozen_prefixes = frozen_stage_prefixes(
            ("conv1", "bn1"), [(f"layer{k}",) for k in (1, 2, 3, 4)], frozen_stages)
        structure, layers = load_structure(structure), tuple(layers)
        if sum(layers) != len(structure) or len(layers) != 4 or len(tuple(dilations)) != 4:
            raise ValueError(f"ScaleNet layers {list(layers)} need {sum(layers)} structure "
                             f"entries and 4 dilations; got {len(structure)} entries and "
                             f"dilations {list(dilations)}")
        stem = 64 // width_div
        self.conv1 = nnx.Conv(in_channels, stem, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                              use_bias=False, kernel_init=conv_init, rngs=rngs)
        self.bn1 = batch_norm(stem, frozen=norm == "frozen" or frozen_stages >= 0, rngs=rngs)
        channels, entries = stem, iter(structure)
        for k, (depth, stride, dilation) in enumerate(zip(layers, (1, 2, 1, 1), dilations)):
            planes = 64 * 2 ** k // width_div
            blocks = []
            for i in range(depth):
                blocks.append(SABlock(channels, planes, next(entries), stride=stride if i == 0
                                      else 1, dilation=dilation,
                                      frozen_bn=norm == "frozen" or k + 1 <= frozen_stages,
                                      rngs=rngs))
                channels = planes * EXPANSION
            setattr(self, f"layer{k + 1}", nnx.List(blocks))
        self.out_channels = tuple(64 * 2 ** k // width_div * EXPANSION for k in range(4))
        self.out_strides = (4, 8, 8, 8)
        self.remat = remat

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x[B,H,W,3]`` -> outputs of layer1..layer4."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = call_block(block, x, self.remat)
            features.append(x)
        return features


def scalenet101(*, structure: str | Sequence, layers: Sequence[int] = (3, 4, 23, 3),
                **kwargs) -> ScaleNet:
    """ScaleNet101 (layers 3, 4, 23, 3); ``layers`` is a knob for tiny test variants."""
    return ScaleNet(structure=structure, layers=layers, **kwargs)
