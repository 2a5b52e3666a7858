"""Proportional Pseudo-mask Generation (PMM, ICCV 2021, section 3.3) and the baseline's
argmax (section 3.1), as pure, jitted jnp functions: the second half of the pseudo-mask core.

The pseudo stage builds the dense-CRF inputs here from the CVS-smoothed CAMs of
``masks/cvs.py`` (:func:`binary_probs`: one two-label CRF per class, PPMG; or
:func:`baseline_probs`: one joint CRF, the baseline), runs the CRF (``masks/dense_crf*.py``),
then turns the posteriors into labels: :func:`ppmg_labels` gives each pixel claimed as
foreground by several classes to the one of largest proportion (:func:`proportion`, the
normalised CAM over the class's foreground mass, so small objects are not swallowed by large
ones); :func:`argmax_labels` is the baseline's argmax.

Same conventions as ``masks/cvs.py``: ONE image with static shapes (``x`` ``[C, H, W]`` over
the C foreground classes, ``present`` ``[C]`` bool, ``valid`` ``[H, W]`` bool or None), absent
classes keep their channel but never win; labels are 0 = background, c + 1 = class c. Semantics
follow the official ``refine_cam.py`` (``ppmg``, ``crf_with_alpha``) as summarised in
``shared/pmm-reference.md``, ties included (the lower index wins).
"""

import jax
import jax.numpy as jnp

from pmm_jax.masks.cvs import valid_mask


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
    valid = valid_mask(valid, x.shape[1:])[None]
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
    valid = valid_mask(valid, x.shape[1:])
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
