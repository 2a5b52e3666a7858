"""The paper's core as pure, jitted jnp functions (PMM, ICCV 2021, sections 3.1-3.4).

Everything here works on ONE image with static shapes, so a caller can ``vmap`` it over a
batch or call it per image without recompiling for a new label set:

* ``cams`` / ``x``: ``[C, H, W]`` float, C = number of FOREGROUND classes (fixed, e.g. 20).
* ``present``: ``[C]`` bool, the image-level label. The official code keeps a dict of present
  classes only; here absent classes keep their channel but are zeroed or masked so that they
  can never influence a statistic or win an argmax.
* ``valid``: ``[H, W]`` bool padding mask or None (= every pixel valid). Statistics (min, max,
  mean, std, sums) ignore invalid pixels and outputs there are 0 (background).

Pseudo-mask generation (``pmm_jax.pseudo_masks``) chains ``normalize`` -> ``cvs`` ->
``binary_probs`` (or ``baseline_probs``), runs the host dense CRF, then ``ppmg_labels`` (or
``argmax_labels``). The segmenter trains with ``pus_loss``. Semantics follow the official
code (Eli-YiLi/PMM ``refine_cam.py`` / ``infer_multi_crop.py`` and Eli-YiLi/WSSS_MMSeg
``cross_entropy_loss.py``) as summarised in ``shared/pmm-reference.md``.
"""

import functools

import jax
import jax.numpy as jnp

# Added to the range in min-max normalisation (official value).
NORM_EPS = 1e-5
# Added to the mean in the coefficient of variation (official: mean(v[v > t] + 1e-8)).
COV_EPS = 1e-8
# Added to the loss before the power in PUS "pow" (official value).
POW_EPS = 1e-9

PUS_MODES = ("none", "clamp", "pow", "ignore")
PUS_REDUCTIONS = ("all", "valid_pixels")


def _valid_mask(valid, shape):
    """``valid`` as an ``[H, W]`` bool array (all True when None)."""
    if valid is None:
        return jnp.ones(shape, dtype=bool)
    return jnp.asarray(valid, dtype=bool)


@functools.partial(jax.jit, static_argnames=("official_quirk",))
def normalize(cams, present, valid=None, official_quirk=False):
    """Per-class min-max normalisation of raw CAMs: ``(x - min) / (max - min + 1e-5)``.

    Why: CVS, the background exponent and PPMG all assume CAMs on a common [0, 1) scale
    (paper eq. 1). min and max are taken per class over the valid pixels of this image.
    Absent classes and invalid pixels give 0.

    ``official_quirk=True`` reproduces the official multi-crop inference exactly: pixels
    below ``min + 1e-5`` are set to 0 BEFORE the shift, so they come out as
    ``-min / (max - min + 1e-5)`` (negative when min > 0) instead of 0. PPMG later maps
    foreground pixels with a value <= 0 to background, so the quirk changes masks slightly.
    """
    x = jnp.asarray(cams, dtype=jnp.float32)
    keep = _valid_mask(valid, x.shape[1:])[None] & jnp.asarray(present, dtype=bool)[:, None, None]
    x_min = jnp.min(jnp.where(keep, x, jnp.inf), axis=(1, 2), keepdims=True)
    x_max = jnp.max(jnp.where(keep, x, -jnp.inf), axis=(1, 2), keepdims=True)
    # Absent classes (and an all-invalid image) have no finite statistics; their output is 0.
    finite = jnp.isfinite(x_min)
    x_min = jnp.where(finite, x_min, 0.0)
    x_max = jnp.where(finite, x_max, 0.0)
    if official_quirk:
        x = jnp.where(x < x_min + NORM_EPS, 0.0, x)
    out = (x - x_min) / (x_max - x_min + NORM_EPS)
    return jnp.where(keep, out, 0.0)


@jax.jit
def coefficient_of_variation(x, present, t, valid=None):
    """Raw coefficient of variation per class: ``std(x_c[x_c > t]) / mean(x_c[x_c > t])``.

    Why: CVS (paper eq. 5) measures how unevenly a class's activation is spread over its
    foreground pixels; a peaky CAM (high CoV) gets smoothed more. Population std (ddof 0) over
    the valid pixels strictly above ``t``; the mean has the official ``+ 1e-8``. Returns 0
    for a class with no such pixel and for absent classes. NOT multiplied by the scale
    ``s`` (``cvs`` does that).
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    fg = (x > t) & _valid_mask(valid, x.shape[1:])[None]
    count = jnp.sum(fg, axis=(1, 2))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(fg, x, 0.0), axis=(1, 2)) / denom
    var = jnp.sum(jnp.where(fg, (x - mean[:, None, None]) ** 2, 0.0), axis=(1, 2)) / denom
    # sqrt has an infinite derivative at 0 (a constant CAM): route those through sqrt(1) * 0.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    cov = std / (mean + COV_EPS)
    return jnp.where((count > 0) & jnp.asarray(present, dtype=bool), cov, 0.0)


@jax.jit
def cvs(x, present, t, s, valid=None):
    """Coefficient of Variation Smoothing (paper eq. 6): ``where(x < t, 0, x) ** (1 - s * CoV)``.

    Why: raising a [0, 1) CAM to a power below 1 lifts weak activations more than strong
    ones, expanding the partial response of a classifier CAM; the exponent adapts to each
    class's CoV. Pixels below ``t`` are zeroed first (official ``cvs[cvs < t] = 0``, so
    ``x == t`` is kept). Absent classes and invalid pixels give 0.

    Pixels whose base is <= 0 always give 0 (finite, with zero gradient): numpy would give
    ``0 ** p = 1`` or ``inf`` for an exponent ``p <= 0`` and NaN for a negative base, which
    only arises when ``s * CoV >= 1`` or ``t < 0`` -- never with the paper's s = 0.3, t = 0.05
    on normalised CAMs (CoV of values in (t, 1] stays far below 1 / 0.3).
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    keep = _valid_mask(valid, x.shape[1:])[None] & jnp.asarray(present, dtype=bool)[:, None, None]
    exponent = (1.0 - s * coefficient_of_variation(x, present, t, valid))[:, None, None]
    base = jnp.where(x < t, 0.0, x)
    positive = base > 0
    # Evaluate the power on a safe base (1) where the result is discarded, so neither the
    # value nor the gradient of 0 ** p can produce inf/NaN.
    smoothed = jnp.where(positive, jnp.where(positive, base, 1.0) ** exponent, 0.0)
    return jnp.where(keep, smoothed, 0.0)


@jax.jit
def binary_probs(x_s, alpha):
    """Per-class two-label CRF input ``[C, 2, H, W]`` = ``[(1 - x_s) ** alpha, x_s]``.

    Why: PPMG runs one binary dense CRF per class (background vs that class) so classes never
    compete on raw scores; the background of a single channel is eq. 2 with max over one class.
    """
    x_s = jnp.asarray(x_s, dtype=jnp.float32)
    return jnp.stack([(1.0 - x_s) ** alpha, x_s], axis=1)


@jax.jit
def baseline_probs(x, present, alpha):
    """Joint CRF input of the baseline (paper 3.1, eq. 2): ``[C+1, H, W]``.

    Channel 0 is ``(1 - max over PRESENT c of x_c) ** alpha`` (1 when no class is present),
    channel ``c + 1`` is ``x_c`` for present classes and 0 for absent ones. The official code
    gives absent classes no channel at all; to reproduce its CRF exactly the caller drops
    the absent channels before the CRF (a zero channel still takes part in mean-field
    normalisation through its clipped 1e-5 probability).
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    present = jnp.asarray(present, dtype=bool)[:, None, None]
    fg_max = jnp.max(jnp.where(present, x, -jnp.inf), axis=0, initial=-jnp.inf)
    fg_max = jnp.where(jnp.isfinite(fg_max), fg_max, 0.0)
    background = (1.0 - fg_max) ** alpha
    return jnp.concatenate([background[None], jnp.where(present, x, 0.0)], axis=0)


@jax.jit
def proportion(x, fg, valid=None):
    """Proportion (importance) map of PPMG (paper eq. 8): ``x_c / (1 + sum_hw(x_c * fg_c))``.

    Why: instead of comparing scores of independently trained binary classifiers, each pixel
    gets its share of the class's total foreground activation, so a small object is not
    swallowed by a large, confidently activated one. ``x`` is the UNSMOOTHED normalised CAM;
    the ``+ 1`` (official) avoids dividing by 0 for an empty foreground. Sums run over valid
    pixels only; invalid pixels give 0.
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    valid = _valid_mask(valid, x.shape[1:])[None]
    mass = jnp.sum(jnp.where(valid & jnp.asarray(fg, dtype=bool), x, 0.0), axis=(1, 2))
    return jnp.where(valid, x / (1.0 + mass[:, None, None]), 0.0)


@jax.jit
def ppmg_labels(x, fg, present, valid=None):
    """Proportional Pseudo-mask Generation (paper eq. 9, Alg. 1): ``[H, W]`` int32 in 0..C.

    ``x``: UNSMOOTHED normalised CAM ``[C, H, W]``; ``fg``: ``[C, H, W]`` bool binary CRF
    foreground (posterior > 0.5). The proportion map is computed here (``proportion``).
    Label = argmax over ``[bg, fg_c * p_c for present c]`` where ``bg`` is 1 on pixels that
    no present class claims as foreground and 0 elsewhere. As in the official ``np.argmax``
    ties go to the lower index, so a foreground pixel whose best score is <= 0 (``x <= 0``,
    e.g. after the official normalisation quirk) becomes background. Absent classes never
    win (score -inf); invalid pixels are 0.
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    present = jnp.asarray(present, dtype=bool)[:, None, None]
    valid = _valid_mask(valid, x.shape[1:])
    fg = jnp.asarray(fg, dtype=bool) & present
    p = proportion(x, fg, valid)
    scores = jnp.where(present, fg.astype(jnp.float32) * p, -jnp.inf)
    background = (~jnp.any(fg, axis=0)).astype(jnp.float32)
    labels = jnp.argmax(jnp.concatenate([background[None], scores], axis=0), axis=0)
    return jnp.where(valid, labels, 0).astype(jnp.int32)


@jax.jit
def argmax_labels(probs, present):
    """Argmax of a joint posterior ``[C+1, H, W]`` (channel 0 background) -> ``[H, W]`` int32.

    Used by the baseline and the CRF-without-PPMG variants. Absent classes never win (score
    -inf), ties go to the lower index (``np.argmax``), so an image with an empty label set is
    all background.
    """
    probs = jnp.asarray(probs, dtype=jnp.float32)
    allowed = jnp.concatenate([jnp.ones((1,), bool), jnp.asarray(present, dtype=bool)])
    scores = jnp.where(allowed[:, None, None], probs, -jnp.inf)
    return jnp.argmax(scores, axis=0).astype(jnp.int32)


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
