"""PSPNet segmenter with mmseg's head settings (Flax NNX, NHWC).

Decode head (mmseg ``PSPHead``): pyramid pooling over the last backbone stage with adaptive
average pooling to n x n for each bin n, each pooled map through 1x1 conv + BN + ReLU to
``channels`` (mmseg gives every bin the full ``channels``, not ``channels / len(bins)`` as the
original PSPNet paper does), bilinear upsampling back, concatenation after the features, 3x3
conv + BN + ReLU to ``channels``, Dropout2d, 1x1 classifier with bias.
Auxiliary head (mmseg ``FCNHead``, one conv, no input concat) on the second-to-last stage:
3x3 conv + BN + ReLU to ``aux_channels``, Dropout2d, 1x1 classifier.

Both outputs stay at feature resolution; ``upsample_logits`` brings them to label size.
All resizing is bilinear with ``align_corners=False`` and no antialiasing, i.e. torch's
``F.interpolate(..., mode="bilinear", align_corners=False)``, in both directions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.models.resnet import ConvBN

CLASSIFIER_INIT = nnx.initializers.normal(0.01)


def _pool_matrix(length: int, bins: int) -> np.ndarray:
    """``[bins, length]`` averaging weights of torch's adaptive pooling along one axis.

    Bin i spans ``[floor(i * length / bins), ceil((i + 1) * length / bins))``; bins may
    overlap (and repeat pixels when ``bins > length``).
    """
    weights = np.zeros((bins, length), np.float32)
    for i in range(bins):
        start = (i * length) // bins
        end = -((-(i + 1) * length) // bins)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """torch's ``adaptive_avg_pool2d`` for NHWC ``x``: ``[B,H,W,C]`` -> ``[B,n,m,C]``.

    A box mean is separable, so it is two small matrix products with weights built from the
    static input shape: any H, W, jit-friendly, exact (HIGHEST precision, no TF32).
    """
    rows, cols = (output_size, output_size) if isinstance(output_size, int) else output_size
    row_weights = jnp.asarray(_pool_matrix(x.shape[1], rows), x.dtype)
    col_weights = jnp.asarray(_pool_matrix(x.shape[2], cols), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", row_weights, x, col_weights,
                      precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size = (h, w)``; torch ``align_corners=False``."""
    batch, _, _, channels = x.shape
    return jax.image.resize(x, (batch, *size, channels), "bilinear", antialias=False)


def upsample_logits(logits: jax.Array, size: Sequence[int]) -> jax.Array:
    """Logits ``[B,h,w,K]`` -> float32 ``[B,size[0],size[1],K]`` for the loss and prediction.

    Float32 so that softmax / cross-entropy never run in a reduced compute dtype.
    """
    return resize_bilinear(logits.astype(jnp.float32), size)


class PyramidPooling(nnx.Module):
    """Concatenates ``x`` with, per bin n, upsample(ConvBN1x1(adaptive_avg_pool(x, n)))."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int], *,
                 rngs: nnx.Rngs):
        self.bins = tuple(bins)
        self.convs = nnx.List([ConvBN(in_channels, channels, 1, rngs=rngs) for _ in self.bins])

    def __call__(self, x: jax.Array) -> jax.Array:
        size = x.shape[1:3]
        pooled = [resize_bilinear(conv(adaptive_avg_pool(x, n)), size)
                  for n, conv in zip(self.bins, self.convs)]
        return jnp.concatenate([x, *pooled], axis=-1)


class PSPHead(nnx.Module):
    """Pyramid pooling -> 3x3 ConvBN -> Dropout2d -> 1x1 classifier."""

    float32_layers = ("classifier",)  # float32 logits under a bfloat16 compute dtype

    def __init__(self, in_channels: int, num_classes: int, *, bins: Sequence[int],
                 channels: int, dropout: float, rngs: nnx.Rngs):
        self.ppm = PyramidPooling(in_channels, channels, bins, rngs=rngs)
        self.bottleneck = ConvBN(in_channels + len(self.ppm.bins) * channels, channels, 3,
                                 rngs=rngs)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), kernel_init=CLASSIFIER_INIT,
                                   rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.classifier(self.dropout(self.bottleneck(self.ppm(x)), rngs=rngs))


class FCNHead(nnx.Module):
    """3x3 ConvBN -> Dropout2d -> 1x1 classifier (the auxiliary head)."""

    float32_layers = ("classifier",)  # float32 logits under a bfloat16 compute dtype

    def __init__(self, in_channels: int, num_classes: int, *, channels: int, dropout: float,
                 rngs: nnx.Rngs):
        self.conv = ConvBN(in_channels, channels, 3, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.classifier = nnx.Conv(channels, num_classes, (1, 1), kernel_init=CLASSIFIER_INIT,
                                   rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.classifier(self.dropout(self.conv(x), rngs=rngs))


class PSPNet(nnx.Module):
    """Backbone + PSP decode head on the last stage + FCN auxiliary head on the one before.

    ``num_classes`` counts background (VOC: 21). New-layer parameters live under
    ``decode_head`` and ``aux_head``, backbone parameters under ``backbone``.
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_classes: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        channels: int = 512,
        dropout: float = 0.1,
        aux_channels: int = 256,
        *,
        rngs: nnx.Rngs,
    ):
        if len(backbone.out_channels) < 2:
            raise ValueError("PSPNet's auxiliary head needs a backbone with at least 2 stages")
        self.backbone = backbone
        self.decode_head = PSPHead(backbone.out_channels[-1], num_classes, bins=bins,
                                   channels=channels, dropout=dropout, rngs=rngs)
        self.aux_head = FCNHead(backbone.out_channels[-2], num_classes, channels=aux_channels,
                                dropout=dropout, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """``x[B,H,W,3]`` -> ``{"logits": [B,h,w,K], "aux_logits": [B,h',w',K]}`` at the
        strides of the last and second-to-last backbone stages; ``rngs`` drives dropout."""
        features = self.backbone(x)
        return {"logits": self.decode_head(features[-1], rngs=rngs),
                "aux_logits": self.aux_head(features[-2], rngs=rngs)}
