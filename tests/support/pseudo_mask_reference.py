"""Naive numpy transcriptions of the paper's / official CAM normalisation, CoV and CVS, and
the random CAM-like maps that ``tests/masks/test_cvs.py`` and ``tests/masks/test_ppmg.py`` run
``pmm_jax.masks`` on (their ``rng``, ``present`` and ``valid`` fixtures are in conftest.py).

The ``np_*`` functions are deliberately naive per-class loops over the PRESENT classes only (a
dict of present classes, like the official code) and over the valid pixels only, so that they
share no masking tricks with the jnp implementation they check.
"""

import numpy as np

import configs

C, H, W = 4, 12, 10
_PAPER = configs.get_config("voc").pseudo  # the paper's t, s and alpha
T, S, ALPHA = _PAPER.t, _PAPER.s, _PAPER.alpha


def np_normalize(cams, present, valid, official_minmax):
    out = np.zeros(cams.shape, np.float64)
    for c in np.flatnonzero(present):
        v = cams[c].astype(np.float64)
        lo, hi = v[valid].min(), v[valid].max()
        if official_minmax:
            v = v.copy()
            v[v < lo + 1e-5] = 0
        out[c][valid] = ((v - lo) / (hi - lo + 1e-5))[valid]
    return out


def np_cov(x, present, t, valid):
    out = np.zeros(len(x))
    for c in np.flatnonzero(present):
        vals = x[c][valid].astype(np.float64)
        vals = vals[vals > t]
        if vals.size:
            out[c] = vals.std() / (vals + 1e-8).mean()
    return out


def np_cvs(x, present, t, s, valid):
    cov = np_cov(x, present, t, valid) * s
    out = np.zeros(x.shape)
    for c in np.flatnonzero(present):
        v = x[c].astype(np.float64).copy()
        v[v < t] = 0
        out[c][valid] = (v ** (1 - cov[c]))[valid]
    return out


def random_cams(rng):
    """Raw CAM-like maps: non-negative, a bright blob per class plus noise."""
    yy, xx = np.mgrid[:H, :W]
    cams = []
    for _ in range(C):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 20))
        cams.append(rng.uniform(0.5, 3.0) * blob + 0.2 * rng.random((H, W)))
    return np.stack(cams).astype(np.float32)


def random_normalized(rng, present, valid):
    return np_normalize(random_cams(rng), present, valid, False).astype(np.float32)


def full_valid():
    return np.ones((H, W), bool)
