"""The pseudo-mask core (PMM, ICCV 2021, sections 3.1-3.3), written once for any array module.

Every function takes the array module ``xp`` first: ``numpy`` in the CPU workers
(``masks/worker.py``, which never import JAX) and ``jax.numpy`` on the device, jitted
(``masks/device.py``). This module itself imports neither. Steps, for ONE image:

* :func:`normalize`: per-class min-max ``(x - min) / (max - min + eps)`` (paper eq. 1);
* :func:`coefficient_of_variation` and :func:`cvs`: Coefficient of Variation Smoothing
  ``where(x < t, 0, x) ** (1 - s * CoV)`` (eq. 5-6);
* :func:`joint_probs` (one CRF over ``[background, classes]``, background
  ``(1 - max_c x_c) ** alpha``, eq. 2) and :func:`binary_probs` (one CRF per class);
* the label rules on the CRF posteriors: :func:`argmax_labels`, :func:`ppmg_labels` (eq. 8-9,
  proportion on the unsmoothed ``x``) and :func:`confident_labels` (rough masks);
* :func:`crf_inputs` and :func:`label_indices` chain them for a variant
  (``masks/variants.py``); the CRF runs between them (``masks/dense_crf*.py``).

Arrays are ``[K, H, W]`` over K classes. The CPU workers pass only the image's PRESENT
classes, unpadded, with ``present`` and ``valid`` None. The device pads (classes to a
bucket, pixels to a shape bucket): ``present`` ``[K]`` bool marks real classes and ``valid``
``[H, W]`` bool real pixels; statistics ignore the rest, which comes out 0 (background).
Labels are indices: 0 background, ``k + 1`` the k-th class given, ``K + 1`` unlabelled
(rough masks); the caller maps them to dataset values. float32 throughout, as the official
code's CRF inputs. Semantics follow the official ``refine_cam.py`` and
``infer_multi_crop.py`` (``shared/pmm-reference.md``), ties included (the lower index wins).
"""

from __future__ import annotations

import contextlib

from pmm_jax.constants import CAM_NORM_EPS, COV_EPS, CRF_FG_THRESHOLD, ROUGH_MASK_THRESHOLD


def _quiet(xp):
    """numpy's floating-point warnings off (overflowing ranges are handled explicitly)."""
    errstate = getattr(xp, "errstate", None)
    return errstate(over="ignore", invalid="ignore") if errstate else contextlib.nullcontext()


def _keep(present, valid):
    """``[K, H, W]``-broadcastable mask of real classes and pixels, or None (all real)."""
    if present is None and valid is None:
        return None
    if present is None:
        return valid[None]
    return present[:, None, None] if valid is None else present[:, None, None] & valid[None]


def normalize(xp, cams, present=None, valid=None, official_minmax=False):
    """Per-class min-max normalisation of raw CAMs ``[K, H, W]``: ``(x - min) / (max - min +
    1e-5)``, min and max over the class's valid pixels; absent classes and invalid pixels 0.

    ``official_minmax`` reproduces the official multi-crop inference: pixels below
    ``min + 1e-5`` are set to 0 BEFORE the shift, so they come out ``-min / (max - min +
    1e-5)`` instead of 0 (docs/fidelity.md). A range that overflows float32 (finite values
    near +-3e38) is normalised after an exact scaling by 2**-64, so such a class is not all 0.
    """
    f32 = xp.float32
    x = xp.asarray(cams, f32)
    keep = _keep(present, valid)
    if keep is None:
        x_min = x.min(axis=(1, 2), keepdims=True)
        x_max = x.max(axis=(1, 2), keepdims=True)
    else:  # absent classes have no statistics: 0
        x_min = xp.min(xp.where(keep, x, xp.inf), axis=(1, 2), keepdims=True)
        x_max = xp.max(xp.where(keep, x, -xp.inf), axis=(1, 2), keepdims=True)
        finite = xp.isfinite(x_min)
        x_min, x_max = xp.where(finite, x_min, f32(0)), xp.where(finite, x_max, f32(0))
    eps = f32(CAM_NORM_EPS)
    if official_minmax:
        x = xp.where(x < x_min + eps, f32(0), x)
    with _quiet(xp):
        out = (x - x_min) / (x_max - x_min + eps)
        k = f32(2.0 ** -64)
        scaled = (x * k - x_min * k) / (x_max * k - x_min * k + eps * k)
        out = xp.where(xp.isfinite(x_max - x_min), out, scaled).astype(f32)
    return out if keep is None else xp.where(keep, out, f32(0))


def coefficient_of_variation(xp, x, t, present=None, valid=None):
    """``[K]`` raw CoV per class, ``std(x_c[x_c > t]) / (mean(x_c[x_c > t]) + 1e-8)`` over
    valid pixels (population std); 0 for a class with no such pixel and for absent classes.
    Not multiplied by ``s`` (:func:`cvs` does)."""
    f32 = xp.float32
    x = xp.asarray(x, f32)
    fg = x > t
    keep = _keep(present, valid)
    if keep is not None:
        fg = fg & keep
    count = xp.sum(fg, axis=(1, 2))
    denom = xp.maximum(count, 1).astype(f32)
    mean = xp.sum(xp.where(fg, x, f32(0)), axis=(1, 2), dtype=f32) / denom
    var = xp.sum(xp.where(fg, (x - mean[:, None, None]) ** 2, f32(0)), axis=(1, 2),
                 dtype=f32) / denom
    # sqrt has an infinite derivative at 0 (a constant CAM): route those through sqrt(1) * 0.
    std = xp.where(var > 0, xp.sqrt(xp.where(var > 0, var, f32(1))), f32(0))
    return xp.where(count > 0, std / (mean + f32(COV_EPS)), f32(0))


def cvs(xp, x, t, s, present=None, valid=None):
    """CVS of normalised CAMs ``[K, H, W]``: ``where(x < t, 0, x) ** (1 - s * CoV)`` (``x ==
    t`` kept, as the official ``cvs[cvs < t] = 0``); absent classes and invalid pixels 0.

    Pixels whose base is <= 0 give 0 (finite, zero gradient), also where numpy would give
    ``0 ** p = 1`` or ``inf`` (``p <= 0``) or NaN (negative base): only when ``s * CoV >= 1``
    or ``t < 0``, never with the paper's s = 0.3, t = 0.05.
    """
    f32 = xp.float32
    x = xp.asarray(x, f32)
    exponent = (1 - s * coefficient_of_variation(xp, x, t, present, valid))[:, None, None]
    base = xp.where(x < t, f32(0), x)
    positive = base > 0
    keep = _keep(present, valid)
    if keep is not None:
        positive = positive & keep
    # The power on a safe base (1) where the result is discarded: no inf/NaN value or gradient.
    return xp.where(positive, xp.where(positive, base, f32(1)) ** exponent.astype(f32), f32(0))


def joint_probs(xp, x, alpha, present=None):
    """One joint CRF's input ``[K + 1, H, W]``: ``[(1 - max_c x_c) ** alpha, x_0, ...]``,
    the max over present classes (K >= 1); absent channels 0. The official code
    gives absent classes no channel at all: pass present classes only to match its CRF (a
    zero channel still takes part in mean-field normalisation through its clipped 1e-5)."""
    f32 = xp.float32
    x = xp.asarray(x, f32)
    if present is not None:
        x = xp.where(present[:, None, None], x, f32(0))
    background = (f32(1) - x.max(axis=0, keepdims=True)) ** f32(alpha)
    return xp.concatenate([background, x]).astype(f32)


def binary_probs(xp, x_s, alpha):
    """``[K, 2, H, W]``: one two-label CRF per class, ``[(1 - x_s) ** alpha, x_s]`` (an all-0
    channel gives ``[1, 0]``, an all-background set)."""
    f32 = xp.float32
    x_s = xp.asarray(x_s, f32)
    return xp.stack([(f32(1) - x_s) ** f32(alpha), x_s], axis=1)


def argmax_labels(xp, posterior, present=None):
    """Label indices ``[H, W]`` of a joint posterior ``[K + 1, H, W]``: its argmax; absent
    classes never win."""
    if present is not None:
        allowed = xp.concatenate([xp.ones((1,), bool), present])
        posterior = xp.where(allowed[:, None, None], posterior, -xp.inf)
    return xp.argmax(posterior, axis=0)


def confident_labels(xp, posterior, present=None):
    """Rough-mask label indices ``[H, W]`` of a joint posterior ``[K + 1, H, W]``: the label
    whose posterior exceeds ``ROUGH_MASK_THRESHOLD``, else ``K + 1`` (unlabelled)."""
    best = argmax_labels(xp, posterior, present)
    top = xp.max(posterior, axis=0)
    return xp.where(top > ROUGH_MASK_THRESHOLD, best, posterior.shape[0])


def ppmg_labels(xp, x, fg, present=None, valid=None):
    """PPMG (paper eq. 8-9, Alg. 1): label indices ``[H, W]`` in ``0..K``.

    ``x``: UNSMOOTHED normalised CAMs ``[K, H, W]``; ``fg``: ``[K, H, W]`` bool, each binary
    CRF's foreground. Each class's proportion ``x_c / (1 + sum(x_c * fg_c))`` (so a small
    object is not swallowed by a large one); label = argmax of ``[bg, fg_c * proportion_c]``
    where ``bg`` is 1 on pixels no class claims. Ties go to the lower index, so a foreground
    pixel whose best score is <= 0 is background; absent classes never win; invalid pixels 0.
    """
    f32 = xp.float32
    x = xp.asarray(x, f32)
    keep = _keep(present, valid)
    if keep is not None:
        fg = fg & keep
    mass = xp.sum(xp.where(fg, x, f32(0)), axis=(1, 2), dtype=f32)
    scores = fg * (x / (f32(1) + mass[:, None, None]))
    if present is not None:
        scores = xp.where(present[:, None, None], scores, -xp.inf)
    background = (~xp.any(fg, axis=0)).astype(f32)
    return xp.argmax(xp.concatenate([background[None], scores]), axis=0)


def crf_inputs(xp, variant, cams, alpha, t, s, official_minmax, present=None, valid=None):
    """``(x, probs)`` of one image for ``variant`` (a ``masks.variants.Variant``): ``x`` the
    CAMs the label rule reads (normalised, or as given for ``smoothing="raw"``), ``probs``
    the CRF label sets ``[S, L, H, W]`` (binary: ``[K, 2, H, W]``; joint: ``[1, K + 1, H,
    W]``)."""
    if variant.smoothing == "raw":
        x = xp.asarray(cams, xp.float32)
    else:
        x = normalize(xp, cams, present, valid, official_minmax)
    x_crf = cvs(xp, x, t, s, present, valid) if variant.smoothing == "cvs" else x
    if variant.crf == "binary":
        return x, binary_probs(xp, x_crf, alpha)
    return x, joint_probs(xp, x_crf, alpha, present)[None]


def label_indices(xp, variant, x, posterior, present=None, valid=None):
    """Label indices ``[H, W]`` (0 background, ``k + 1`` class k, ``K + 1`` unlabelled) of
    ``variant``'s rule on the CRF posterior ``[S, L, H, W]`` of :func:`crf_inputs`."""
    if variant.labels == "ppmg":
        return ppmg_labels(xp, x, posterior[:, 1] > CRF_FG_THRESHOLD, present, valid)
    rule = confident_labels if variant.labels == "confident" else argmax_labels
    labels = rule(xp, posterior[0], present)
    return labels if valid is None else xp.where(valid, labels, 0)
