"""What every backbone is (:class:`Backbone`, the contract the heads, the optimisers and the
weight loaders rely on) and the layers the backbones share: torch-default BatchNorm, frozen
BatchNorm, He-initialised convolutions with torch's padding, mmseg's frozen stages."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@runtime_checkable
class Backbone(Protocol):
    """A backbone maps ``[B, H, W, 3]`` images to a list of per-stage NHWC features.

    Attributes:
      out_channels: channels of each stage's features.
      out_strides: input-to-feature stride of each stage.
      frozen_prefixes: attribute names of its frozen stages (mmseg's ``frozen_stages``):
        their parameters are never updated (``training.optimizers``); () when none.
    """

    out_channels: tuple[int, ...]
    out_strides: tuple[int, ...]
    frozen_prefixes: tuple[str, ...]

    def __call__(self, x: jax.Array) -> list[jax.Array]: ...


BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # flax's decay; torch (Sync)BatchNorm momentum 0.1
NORMS = ("frozen", "batch")


def conv_init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """He normal over fan-out, ``N(0, 2 / (kh * kw * out))`` (torch ``kaiming_normal_(mode=
    "fan_out")``, ScaleNet's own init; ResNet38-d uses ``resnet38.torch_conv_init``); untruncated,
    which also compiles far faster on CPU than the truncated normal."""
    fan_out = int(np.prod(shape[:-2])) * shape[-1]
    return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / fan_out).astype(dtype)


class FrozenBatchNorm(nnx.Module):
    """BatchNorm that always normalises with its running statistics (torch BN in ``eval()``).

    Same variable names as ``nnx.BatchNorm`` (``scale``, ``bias``: Param; ``mean``, ``var``:
    BatchStat) so checkpoints and converters treat both alike. ``dtype`` (as flax's, set by
    ``pmm_jax.training.precision``) is the dtype of the output; the affine map is computed in float32.
    """

    def __init__(self, num_features: int, *, epsilon: float = BN_EPSILON):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.epsilon = epsilon
        self.dtype = None  # None: the promoted dtype of input and statistics

    def __call__(self, x: jax.Array) -> jax.Array:
        mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.epsilon)
        y = x * mul + (self.bias[...] - self.mean[...] * mul)
        return y if self.dtype is None else y.astype(self.dtype)


def batch_norm(channels: int, *, frozen: bool, rngs: nnx.Rngs) -> nnx.Module:
    """``FrozenBatchNorm`` when ``frozen``, else a trainable ``nnx.BatchNorm`` with torch's
    defaults (momentum 0.1, epsilon 1e-5). Both hold ``scale``, ``bias``, ``mean``, ``var``."""
    if frozen:
        return FrozenBatchNorm(channels)
    return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def check_norm(norm: str) -> None:
    """ValueError unless ``norm`` is one of :data:`NORMS`."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def frozen_stage_prefixes(stem: Sequence[str], stages: Sequence[Sequence[str]],
                          frozen_stages: int) -> tuple[str, ...]:
    """Attribute names of mmseg's ``frozen_stages``: -1 none, 0 the ``stem`` names, k >= 1 the
    stem and the names of ``stages[:k]``; ValueError outside -1 .. len(stages)."""
    if not -1 <= frozen_stages <= len(stages):
        raise ValueError(f"frozen_stages must be in -1..{len(stages)} (-1: nothing frozen, "
                         f"0: the stem, k: the stem and the first k stages), got {frozen_stages}")
    if frozen_stages < 0:
        return ()
    return tuple(stem) + tuple(name for stage in stages[:frozen_stages] for name in stage)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         dilation: int = 1, kernel_init=conv_init, rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free conv with torch's symmetric padding ``dilation * (k // 2)``; ResNet38-d's
    own convs pass ``kernel_init=resnet38.torch_conv_init``."""
    pad = dilation * (kernel_size // 2)
    return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
                    padding=((pad, pad), (pad, pad)), kernel_dilation=dilation, use_bias=False,
                    kernel_init=kernel_init, rngs=rngs)
