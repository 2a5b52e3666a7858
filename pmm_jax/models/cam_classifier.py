"""SEAM-style multi-label CAM classifier and its loss.

The CAM head is channel dropout (torch ``Dropout2d``, rate 0.5 in SEAM) followed by a 1x1 conv
without bias from the last backbone stage to one map per foreground class; the image logits
are the spatial mean of those maps. Because the head is linear, GAP(conv(f)) = conv(GAP(f)):
the classifier is an ordinary GAP classifier whose pre-pooling maps *are* the CAMs, at the
backbone's output stride.

The returned CAM is raw (no ReLU, no normalisation); the CAM stage rectifies, resizes and
normalises it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CAMClassifier(nnx.Module):
    """Backbone -> Dropout2d -> 1x1 conv (no bias) = CAM ``[B,h,w,C]``; logits = mean over h, w.

    ``backbone`` follows the protocol of ``pmm_jax.models.resnet`` (list of stage features,
    ``out_channels``). Parameters of the new layer live outside ``backbone`` (attribute
    ``classifier``), so optimisers can give them their own learning rate by path. The head
    computes in float32 whatever the backbone's compute dtype (``pmm_jax.training.precision``).
    """

    float32_layers = ("classifier",)

    def __init__(self, backbone: nnx.Module, num_foreground: int, dropout: float = 0.5, *,
                 rngs: nnx.Rngs):
        self.backbone = backbone
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.classifier = nnx.Conv(
            backbone.out_channels[-1],
            num_foreground,
            (1, 1),
            use_bias=False,
            kernel_init=nnx.initializers.xavier_uniform(),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """``x[B,H,W,3]`` -> ``{"cam": [B,h,w,C], "logits": [B,C]}``.

        ``rngs`` (the trainer's per-step ``fold_in`` keys) drives dropout when given; without
        it dropout uses the module's own key stream.
        """
        features = self.backbone(x)[-1]
        cam = self.classifier(self.dropout(features, rngs=rngs))
        return {"cam": cam, "logits": jnp.mean(cam, axis=(1, 2))}


def multilabel_soft_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """torch's ``MultiLabelSoftMarginLoss`` (mean reduction).

    Per class: ``-(y log sigmoid(x) + (1 - y) log sigmoid(-x))``; mean over classes, then over
    the batch. ``logits``, ``labels``: ``[B, C]``, labels multi-hot (0/1, float or bool).
    """
    labels = labels.astype(logits.dtype)
    per_class = -(labels * jax.nn.log_sigmoid(logits)
                  + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
    return jnp.mean(jnp.mean(per_class, axis=-1))
