"""Wide ResNet38-d (Wu et al., "Wider or deeper"), the CAM backbone of PSA, SEAM and PMM.

Pre-activation residual network, NHWC, with the official PyTorch module names as attribute
names (``conv1a``, ``b2``, ``b2_1``, ..., ``b7``, ``bn7``; inside blocks ``bn_branch2a``,
``conv_branch2a``, ...), so a PyTorch state-dict key and the path of the same tensor here are
the same string (see ``pmm_jax.convert``).

Layout (channels at ``width_div=1``; input stride 1 conv, then):

=====  ========================  =============  =======  ========
stage  blocks                    mid -> out     stride   dilation
=====  ========================  =============  =======  ========
b2     3 basic                   128 -> 128     2        1
b3     3 basic                   256 -> 256     2        1
b4     6 basic                   512 -> 512     2        1
b5     3 basic                   512 -> 1024    1        2 (first conv of b5: 1)
b6     1 bottleneck, drop 0.3    512/1024->2048 1        4
b7     1 bottleneck, drop 0.5    1024/2048->4096 1       2 (PMM classifier; 4 in SEAM/seg)
=====  ========================  =============  =======  ========

Output stride 8. ``dilations`` sets (b5, b6, b7); the classifier default (2, 4, 2) is PMM's
``network/resnet38d.py``, (2, 4, 4) is SEAM's and the segmenter's (WSSS_MMSeg
``mmseg/models/backbones/resnet38d.py``, ``WideRes38``).

Features (backbone protocol): one per stage, each the *activated* output, i.e.
``relu(bn(x))`` with the BN that the next block applies first (pre-activation). So feature 2
is SEAM's ``conv4`` (512 ch), feature 3 its ``conv5`` (1024 ch) and feature 5 its ``conv6``
(``relu(bn7(b7))``, 4096 ch) -- exactly what the official ``forward_as_dict`` exposes.

BatchNorm (``norm``): the official classifier keeps every BN in inference mode with frozen
affine parameters, so by default (``norm="frozen"``) BN always uses the running statistics
(``FrozenBatchNorm``); freezing the affine parameters and ``conv1a`` (and b2 for SEAM) is the
optimiser's job (a mask by parameter path, see ``pmm_jax.cams.seam.param_labels``). The
segmenter's WideRes38 trains its BN (SyncBN, ``norm_eval=False``): ``norm="batch"`` builds
trainable ``nnx.BatchNorm`` (torch momentum 0.1, epsilon 1e-5), whose statistics are those of
the global batch under ``jax.jit`` with a sharded batch. Dropout (b6, b7: torch
``Dropout2d``) is active in train mode only.

Frozen stages (``frozen_stages``, mmseg's meaning): -1 nothing; 0 the stem (``conv1a``);
k >= 1 the stem and stages b2 .. b(k+1). ``frozen_prefixes`` lists their attribute names for
an optimiser mask (the classifier's default 1 is PMM/SEAM's ``not_training``: conv1a, b2);
their BN layers are ``FrozenBatchNorm`` whatever ``norm`` says (mmseg puts frozen stages in
eval mode). ``out_indices`` picks features (mmseg's name): the segmenter uses (1, 2, 3, 5),
WideRes38's ``[conv3, conv4, conv5, conv6]`` (256, 512, 1024, 4096 channels at strides
4, 8, 8, 8), so PSPNet's auxiliary head reads conv5 (1024 channels) as in WSSS_MMSeg.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.models.backbone import batch_norm, check_norm, conv, frozen_stage_prefixes
from pmm_jax.models.remat import call_block

def torch_conv_init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """PyTorch's default ``nn.Conv2d`` weight, ``kaiming_uniform_(a=sqrt(5))``:
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = kh * kw * in`` (variance
    ``1 / (3 fan_in)``). The official ResNet38-d (SEAM/PMM ``resnet38d.Net``, WSSS_MMSeg
    ``WideRes38``) keeps it for every backbone conv; see docs/models.md, "Divergence from
    random init", for why He init diverges in this pre-activation network."""
    bound = 1.0 / np.sqrt(int(np.prod(shape[:-1])))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def conv38(*args, **kwargs) -> nnx.Conv:
    """:func:`conv` initialised as the official ResNet38-d (:func:`torch_conv_init`)."""
    return conv(*args, kernel_init=torch_conv_init, **kwargs)


class ResBlock(nnx.Module):
    """Pre-activation basic block: BN-ReLU, 3x3 (strided, ``first_dilation``), BN-ReLU, 3x3.

    The shortcut is the identity, or a strided 1x1 conv of the *activated* input when the
    shape changes. Returns ``(output, relu(bn(input)))``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, *,
                 stride: int = 1, first_dilation: int = 1, dilation: int = 1,
                 frozen_bn: bool = True, rngs: nnx.Rngs):
        self.bn_branch2a = batch_norm(in_channels, frozen=frozen_bn, rngs=rngs)
        self.conv_branch2a = conv38(in_channels, mid_channels, 3, stride=stride,
                                    dilation=first_dilation, rngs=rngs)
        self.bn_branch2b1 = batch_norm(mid_channels, frozen=frozen_bn, rngs=rngs)
        self.conv_branch2b1 = conv38(mid_channels, out_channels, 3, dilation=dilation, rngs=rngs)
        same_shape = in_channels == out_channels and stride == 1
        self.conv_branch1 = (None if same_shape else
                             conv38(in_channels, out_channels, 1, stride=stride, rngs=rngs))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        act = jax.nn.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(act)
        branch = self.conv_branch2a(act)
        branch = self.conv_branch2b1(jax.nn.relu(self.bn_branch2b1(branch)))
        return shortcut + branch, act


class ResBlockBot(nnx.Module):
    """Pre-activation bottleneck: BN-ReLU, 1x1 to out/4, BN-ReLU-Dropout2d, dilated 3x3 to
    out/2, BN-ReLU-Dropout2d, 1x1 to out; 1x1 projection shortcut of the activated input.
    Returns ``(output, relu(bn(input)))``."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int, dropout: float,
                 frozen_bn: bool = True, rngs: nnx.Rngs):
        quarter, half = out_channels // 4, out_channels // 2
        self.bn_branch2a = batch_norm(in_channels, frozen=frozen_bn, rngs=rngs)
        self.conv_branch2a = conv38(in_channels, quarter, 1, rngs=rngs)
        self.bn_branch2b1 = batch_norm(quarter, frozen=frozen_bn, rngs=rngs)
        self.dropout_2b1 = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.conv_branch2b1 = conv38(quarter, half, 3, dilation=dilation, rngs=rngs)
        self.bn_branch2b2 = batch_norm(half, frozen=frozen_bn, rngs=rngs)
        self.dropout_2b2 = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.conv_branch2b2 = conv38(half, out_channels, 1, rngs=rngs)
        self.conv_branch1 = conv38(in_channels, out_channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        act = jax.nn.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(act)
        branch = self.conv_branch2b1(self.dropout_2b1(jax.nn.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(jax.nn.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(act) + branch, act


class ResNet38(nnx.Module):
    """Wide ResNet38-d backbone; see the module docstring.

    Args:
      width_div: divides every channel count (1 = the official network; tests use 16+).
      blocks: basic blocks in b2, b3, b4, b5 (official (3, 3, 6, 3)).
      dilations: dilation of (b5, b6, b7).
      dropout: Dropout2d rates of (b6, b7).
      norm: "frozen" (every BN on running statistics; the classifier) or "batch" (trainable
        BatchNorm; the segmenter).
      frozen_stages: -1 .. 6, see the module docstring (default 1: conv1a and b2).
      out_indices: which of the six features to return (default all).
      remat: run each block under ``nnx.remat`` (``pmm_jax.models.remat``; config key
        ``model.remat``): less activation memory, same results.

    Attributes:
      out_channels, out_strides: per returned feature.
      frozen_prefixes: attribute names of the frozen stem and stages (an optimiser mask).
    """

    def __init__(self, *, width_div: int = 1, blocks: Sequence[int] = (3, 3, 6, 3),
                 dilations: Sequence[int] = (2, 4, 2), dropout: Sequence[float] = (0.3, 0.5),
                 norm: str = "frozen", frozen_stages: int = 1,
                 out_indices: Sequence[int] | None = None, in_channels: int = 3,
                 remat: bool = False, rngs: nnx.Rngs):
        blocks, dilations, dropout = tuple(blocks), tuple(dilations), tuple(dropout)
        if len(blocks) != 4 or len(dilations) != 3 or len(dropout) != 2:
            raise ValueError("resnet38 needs 4 block counts (b2..b5), 3 dilations (b5, b6, b7) "
                             f"and 2 dropout rates (b6, b7); got {blocks}, {dilations}, {dropout}")
        check_norm(norm)
        out_indices = tuple(range(6)) if out_indices is None else tuple(out_indices)
        if not out_indices or any(not 0 <= i < 6 for i in out_indices):
            raise ValueError(f"resnet38 out_indices must be in 0..5, got {list(out_indices)}")
        # Stage k (1-based: b2 = 1 .. b7 = 6) has frozen BN when k <= frozen_stages.
        frozen_bn = lambda k: norm == "frozen" or k <= frozen_stages
        ch = lambda c: max(1, c // width_div)
        self.conv1a = conv38(in_channels, ch(64), 3, rngs=rngs)
        # (stage, mid, out, stride, first dilation, dilation) of the basic-block stages.
        specs = ((2, 128, 128, 2, 1, 1), (3, 256, 256, 2, 1, 1), (4, 512, 512, 2, 1, 1),
                 (5, 512, 1024, 1, 1, dilations[0]))
        stage_names, channels = [], ch(64)
        for (stage, mid, out, stride, first, dil), depth in zip(specs, blocks):
            names = [f"b{stage}"] + [f"b{stage}_{i}" for i in range(1, depth)]
            for i, name in enumerate(names):
                setattr(self, name, ResBlock(
                    channels, ch(mid), ch(out), stride=stride if i == 0 else 1,
                    first_dilation=first if i == 0 else dil, dilation=dil,
                    frozen_bn=frozen_bn(stage - 1), rngs=rngs))
                channels = ch(out)
            stage_names.append(tuple(names))
        self.b6 = ResBlockBot(channels, ch(2048), dilation=dilations[1], dropout=dropout[0],
                              frozen_bn=frozen_bn(5), rngs=rngs)
        self.b7 = ResBlockBot(ch(2048), ch(4096), dilation=dilations[2], dropout=dropout[1],
                              frozen_bn=frozen_bn(6), rngs=rngs)
        self.bn7 = batch_norm(ch(4096), frozen=frozen_bn(6), rngs=rngs)
        self.stage_names = tuple(stage_names) + (("b6",), ("b7",))
        self.frozen_prefixes = frozen_stage_prefixes(
            ("conv1a",), self.stage_names[:-1] + (("b7", "bn7"),), frozen_stages)
        self.out_indices = out_indices
        self.remat = remat
        channels = (ch(128), ch(256), ch(512), ch(1024), ch(2048), ch(4096))
        self.out_channels = tuple(channels[i] for i in out_indices)
        self.out_strides = tuple((2, 4, 8, 8, 8, 8)[i] for i in out_indices)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """``x[B,H,W,3]`` -> activated features of b2..b7 at strides 2, 4, 8, 8, 8, 8 (those
        of ``out_indices``)."""
        x = self.conv1a(x)
        features = []
        for k, stage in enumerate(self.stage_names):
            for i, name in enumerate(stage):
                x, act = call_block(getattr(self, name), x, self.remat)
                if i == 0 and k > 0:  # the activated output of the previous stage
                    features.append(act)
        features.append(jax.nn.relu(self.bn7(x)))
        return [features[i] for i in self.out_indices]
