"""CAM normalisation and Coefficient of Variation Smoothing (PMM, ICCV 2021, sections 3.1-3.2)
as pure, jitted jnp functions: the first half of the paper's pseudo-mask core.

Every function works on ONE image with static shapes, so a caller can ``vmap`` it over a
batch or call it per image without recompiling for a new label set:

* ``cams`` / ``x``: ``[C, H, W]`` float, C = number of FOREGROUND classes (fixed, e.g. 20).
* ``present``: ``[C]`` bool, the image-level label. The official code keeps a dict of present
  classes only; here absent classes keep their channel but are zeroed or masked so that they
  can never influence a statistic or win an argmax.
* ``valid``: ``[H, W]`` bool padding mask or None (= every pixel valid). Statistics (min, max,
  mean, std) ignore invalid pixels and outputs there are 0 (background).

Pseudo-mask generation (``pmm_jax.masks.generator``) chains :func:`normalize` -> :func:`cvs`
-> the CRF inputs of ``masks/ppmg.py``, runs the dense CRF (``masks/dense_crf*.py``), then
PPMG's label rule (``masks/ppmg.py``). Semantics follow the official code (Eli-YiLi/PMM
``refine_cam.py`` and ``infer_multi_crop.py``) as summarised in ``shared/pmm-reference.md``;
the one deliberate difference (the official min-max quirk, ``official_minmax``) is in
docs/fidelity.md.
"""

import functools

import jax
import jax.numpy as jnp

# Added to the range in min-max normalisation (official value).
NORM_EPS = 1e-5

# Added to the mean in the coefficient of variation (official: mean(v[v > t] + 1e-8)).
COV_EPS = 1e-8


def valid_mask(valid, shape):
    """``valid`` as an ``[H, W]`` bool array (all True when None); ``masks/ppmg.py`` uses it too."""
    if valid is None:
        return jnp.ones(shape, dtype=bool)
    return jnp.asarray(valid, dtype=bool)


@functools.partial(jax.jit, static_argnames=("official_minmax",))
def normalize(cams, present, valid=None, official_minmax=False):
    """Per-class min-max normalisation of raw CAMs: ``(x - min) / (max - min + 1e-5)``.

    Why: CVS, the background exponent and PPMG all assume CAMs on a common [0, 1) scale
    (paper eq. 1). min and max are taken per class over the valid pixels of this image.
    Absent classes and invalid pixels give 0.

    ``official_minmax=True`` reproduces the official multi-crop inference exactly: pixels
    below ``min + 1e-5`` are set to 0 BEFORE the shift, so they come out as
    ``-min / (max - min + 1e-5)`` (negative when min > 0) instead of 0. PPMG later maps
    foreground pixels with a value <= 0 to background, so the quirk changes masks slightly.
    """
    x = jnp.asarray(cams, dtype=jnp.float32)
    keep = valid_mask(valid, x.shape[1:])[None] & jnp.asarray(present, dtype=bool)[:, None, None]
    x_min = jnp.min(jnp.where(keep, x, jnp.inf), axis=(1, 2), keepdims=True)
    x_max = jnp.max(jnp.where(keep, x, -jnp.inf), axis=(1, 2), keepdims=True)
    # Absent classes (and an all-invalid image) have no finite statistics; their output is 0.
    finite = jnp.isfinite(x_min)
    x_min = jnp.where(finite, x_min, 0.0)
    x_max = jnp.where(finite, x_max, 0.0)
    if official_minmax:
        x = jnp.where(x < x_min + NORM_EPS, 0.0, x)
    out = (x - x_min) / (x_max - x_min + NORM_EPS)
    # CAMs whose range overflows float32 (finite values near +-3e38) would come out all 0 (an
    # all-background mask): those classes are normalised after an exact scaling by 2**-64,
    # which brings any finite range within float32. Every other class keeps the line above.
    k = 2.0 ** -64
    scaled = (x * k - x_min * k) / (x_max * k - x_min * k + NORM_EPS * k)
    out = jnp.where(jnp.isfinite(x_max - x_min), out, scaled)
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
    fg = (x > t) & valid_mask(valid, x.shape[1:])[None]
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
    keep = valid_mask(valid, x.shape[1:])[None] & jnp.asarray(present, dtype=bool)[:, None, None]
    exponent = (1.0 - s * coefficient_of_variation(x, present, t, valid))[:, None, None]
    base = jnp.where(x < t, 0.0, x)
    positive = base > 0
    # Evaluate the power on a safe base (1) where the result is discarded, so neither the
    # value nor the gradient of 0 ** p can produce inf/NaN.
    smoothed = jnp.where(positive, jnp.where(positive, base, 1.0) ** exponent, 0.0)
    return jnp.where(keep, smoothed, 0.0)
