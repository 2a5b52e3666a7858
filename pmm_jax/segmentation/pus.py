"""The Pretended Under-fitting Strategy loss (PMM, ICCV 2021, section 3.4) the segmenter
trains with: softmax cross-entropy whose large per-pixel losses are suppressed once the mean
loss falls below a warm-up threshold, so the network stops fitting the pseudo-masks' noise.

A pure, jitted jnp function of one forward pass's logits (``[B, H, W, K]``) and labels
(``[B, H, W]``, 255 ignored); the seg stage (``segmentation/losses.py`` ``head_losses``) calls it once per
head, decode and auxiliary, each with its own warm-up test. Modes (:data:`PUS_MODES`):
"none" (plain cross-entropy), "clamp", "pow", "ignore"; reductions (:data:`PUS_REDUCTIONS`):
"all" (the official mean over every pixel, ignored ones included) or "valid_pixels".
Semantics follow Eli-YiLi/WSSS_MMSeg ``mmseg/models/losses/cross_entropy_loss.py`` as
summarised in ``shared/pmm-reference.md``.
"""

import functools

import jax
import jax.numpy as jnp

# Added to the loss before the power in PUS "pow" (official value).
POW_EPS = 1e-9

PUS_MODES = ("none", "clamp", "pow", "ignore")

PUS_REDUCTIONS = ("all", "valid_pixels")


@functools.partial(jax.jit, static_argnames=("mode", "ignore_label", "reduction"))
def pus_loss(logits, labels, *, mode, beta, kappa, ignore_label=255, reduction="all"):
    """Softmax cross-entropy with the Pretended Under-fitting Strategy (paper 3.4, eq. 10-13).

    Why: late in training the network starts fitting the noise of the pseudo-masks; once the
    mean loss drops below the warm-up threshold ``beta``, the large per-pixel losses (mostly
    wrong labels) are suppressed.

    ``logits``: ``[B, H, W, K]``; ``labels``: ``[B, H, W]`` int with ``ignore_label`` ignored.
    L = per-pixel CE, 0 at ignored pixels. If ``mean(L) < beta`` (mean over ALL B*H*W pixels,
    ignored ones included, as in WSSS_MMSeg; one test per call, so call once per head):

    * ``"clamp"``: ``min(L, kappa)`` (clamped pixels get zero gradient);
    * ``"pow"``: ``(L + 1e-9) ** kappa``, applied to every pixel as in the official code, so
      an ignored pixel contributes the constant ``1e-9 ** kappa`` under ``reduction="all"``;
    * ``"ignore"``: ``L * (L <= kappa)``;
    * ``"none"``: plain CE (``beta`` and ``kappa`` unused).

    ``reduction="all"`` (official, mmseg ``reduction='mean'``) averages over all B*H*W pixels;
    ``"valid_pixels"`` (this project's option) averages over non-ignored pixels only, which
    then contribute nothing. Returns a float32 scalar; differentiable with ``jax.grad``.
    """
    if mode not in PUS_MODES:
        raise ValueError(f"unknown PUS mode {mode!r}; expected one of {PUS_MODES}")
    if reduction not in PUS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {PUS_REDUCTIONS}")
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, dtype=jnp.float32), axis=-1)
    labels = jnp.asarray(labels, dtype=jnp.int32)
    ignored = labels == ignore_label
    safe_labels = jnp.where(ignored, 0, labels)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    loss = jnp.where(ignored, 0.0, nll)

    if mode == "clamp":
        suppressed = jnp.minimum(loss, kappa)
    elif mode == "pow":
        suppressed = (loss + POW_EPS) ** kappa
    elif mode == "ignore":
        suppressed = loss * (loss <= kappa)
    else:
        suppressed = loss
    warm = jnp.mean(loss) < beta
    loss = jnp.where(warm, suppressed, loss)

    if reduction == "all":
        return jnp.mean(loss)
    count = jnp.sum(~ignored)
    return jnp.sum(jnp.where(ignored, 0.0, loss)) / jnp.maximum(count, 1)
