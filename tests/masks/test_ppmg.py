"""pmm_jax.masks.core's CRF inputs, PPMG labels and argmax, on numpy and jitted on jax.numpy
(the ``core_xp`` fixture), against direct numpy transcriptions of the paper / official
formulas (the official PPMG loop among them), and the jnp core composed under jit and vmap.

The ``np_*`` functions below are deliberately naive per-class loops over the PRESENT classes
only, as in ``tests/support/pseudo_mask_reference.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmm_jax.masks import core
from tests.support.pseudo_mask_reference import (
    ALPHA, C, H, S, T, W, full_valid, np_cvs, np_normalize, random_cams, random_normalized)


# ---------------------------------------------------------------------------- transcriptions

def np_binary_probs(x_s, alpha):
    out = np.zeros((x_s.shape[0], 2) + x_s.shape[1:])
    for c in range(x_s.shape[0]):
        out[c, 0] = np.power(1 - x_s[c].astype(np.float64), alpha)
        out[c, 1] = x_s[c]
    return out


def np_baseline_probs(x, present, alpha):
    out = np.zeros((x.shape[0] + 1,) + x.shape[1:])
    keys = np.flatnonzero(present)
    if keys.size:
        v = np.stack([x[c] for c in keys]).astype(np.float64)
        out[0] = np.power(1 - v.max(axis=0), alpha)
    else:
        out[0] = 1.0
    for c in keys:
        out[c + 1] = x[c]
    return out


def np_ppmg(x, fg, present, valid):
    """The official PPMG loop: background starts at 1 and loses every claimed pixel."""
    foreground = [np.ones(x.shape[1:])]
    importance = [foreground[0]]
    keys = [0]
    for c in np.flatnonzero(present):
        v = x[c].astype(np.float64)
        fg_c = (fg[c] & valid).astype(np.float64)
        foreground.append(fg_c)
        importance.append(v / (1 + (v * fg_c).sum()))
        keys.append(c + 1)
        foreground[0] = foreground[0] * (fg_c == 0)
        importance[0] = foreground[0]
    index = np.argmax(np.stack(foreground) * np.stack(importance), axis=0)
    return np.where(valid, np.asarray(keys)[index], 0)


def np_argmax_labels(probs, present):
    keys = [0] + [c + 1 for c in np.flatnonzero(present)]
    return np.asarray(keys)[np.argmax(probs[keys], axis=0)]


# ------------------------------------------------------------------------ CRF input builders

def test_binary_probs_matches_numpy(rng, present, core_xp):
    x_s = np.asarray(core.cvs(np, random_normalized(rng, present, full_valid()), T, S, present))
    got = np.asarray(core_xp.binary_probs(x_s, ALPHA))
    assert got.shape == (C, 2, H, W)
    np.testing.assert_allclose(got, np_binary_probs(x_s, ALPHA), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("label_set", [[True, False, True, True], [False, True, False, False],
                                       [False] * C])
def test_baseline_probs_matches_numpy(rng, label_set, core_xp):
    present = np.array(label_set)
    x = random_normalized(rng, present, full_valid())
    got = np.asarray(core_xp.joint_probs(x, ALPHA, present))
    assert got.shape == (C + 1, H, W)
    np.testing.assert_allclose(got, np_baseline_probs(x, present, ALPHA), rtol=1e-5, atol=1e-7)


def test_baseline_probs_ignores_absent_classes(rng, present, core_xp):
    x = random_normalized(rng, present, full_valid())
    x[1] = 1.0  # absent class with maximal score must not lower the background
    got = np.asarray(core_xp.joint_probs(x, ALPHA, present))
    np.testing.assert_allclose(got[0], np.power(1 - x[present].max(0), ALPHA), rtol=1e-5,
                               atol=1e-7)
    assert np.all(got[2] == 0)


# -------------------------------------------------------------------------- proportion, PPMG

def random_fg(rng, x):
    return (x > 0.3) | (rng.random(x.shape) < 0.1)


@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ppmg_matches_official_loop(present, valid, use_valid, seed, core_xp):
    rng = np.random.default_rng(seed)
    mask = valid if use_valid else full_valid()
    x = random_normalized(rng, present, mask)
    fg = random_fg(rng, x)
    got = np.asarray(core_xp.ppmg_labels(x, fg, present, mask if use_valid else None))
    assert np.issubdtype(got.dtype, np.integer) and got.shape == (H, W)
    np.testing.assert_array_equal(got, np_ppmg(x, fg, present, mask))


def test_ppmg_edge_cases(present, core_xp):
    x = np.zeros((C, H, W), np.float32)
    fg = np.zeros((C, H, W), bool)
    # pixel (0,0): classes 0 and 2 tie exactly -> lower index (label 1).
    x[0, 0, 0] = x[2, 0, 0] = 0.5
    fg[0, 0, 0] = fg[2, 0, 0] = True
    # pixel (1,1): foreground with x = 0 -> background; (1,2): foreground with x < 0 (quirk).
    fg[3, 1, 1] = True
    x[3, 1, 2], fg[3, 1, 2] = -0.2, True
    # pixel (2,2): absent class 1 with a huge score never wins; nobody else claims it.
    x[1, 2, 2], fg[1, 2, 2] = 1.0, True
    # pixel (3,3): only class 3 claims it.
    x[3, 3, 3], fg[3, 3, 3] = 0.9, True
    got = np.asarray(core_xp.ppmg_labels(x, fg, present))
    np.testing.assert_array_equal(got, np_ppmg(x, fg, present, full_valid()))
    assert got[0, 0] == 1 and got[1, 1] == 0 and got[1, 2] == 0 and got[2, 2] == 0
    assert got[3, 3] == 4 and np.count_nonzero(got) == 2
    # An empty label set gives all background whatever the inputs.
    assert np.all(np.asarray(core_xp.ppmg_labels(x, fg, np.zeros(C, bool))) == 0)


def test_ppmg_proportion_prefers_small_object(present, core_xp):
    """A pixel claimed by a big, bright class and a small, dimmer one goes to the small one."""
    x = np.zeros((C, H, W), np.float32)
    fg = np.zeros((C, H, W), bool)
    x[0], fg[0] = 0.9, True                   # class 0 everywhere
    x[2, :2, :2], fg[2, :2, :2] = 0.6, True   # class 2 on a 2x2 patch
    got = np.asarray(core_xp.ppmg_labels(x, fg, present))
    assert np.all(got[:2, :2] == 3) and np.all(got[2:] == 1)


# ---------------------------------------------------------------------------- argmax labels

@pytest.mark.parametrize("label_set", [[True, False, True, True], [False] * C])
def test_argmax_labels_matches_numpy(rng, label_set, core_xp):
    present = np.array(label_set)
    probs = rng.random((C + 1, H, W)).astype(np.float32)
    probs[1] += 1.0  # absent class 0-based 1 (label 2) would win everywhere if allowed
    probs[3, 0, 0] = probs[4, 0, 0] = 5.0  # tie between labels 3 and 4 -> 3
    got = np.asarray(core_xp.argmax_labels(probs, present))
    assert np.issubdtype(got.dtype, np.integer)
    np.testing.assert_array_equal(got, np_argmax_labels(probs, present))
    if present.any():
        assert got[0, 0] == 3 and not np.any(got == 2)
    else:
        assert np.all(got == 0)


def test_core_functions_compose_under_jit_and_vmap(rng, present):
    """One jitted, vmapped pipeline over a batch of images, as the pseudo-mask stage may use."""
    cams = np.stack([random_cams(rng) for _ in range(3)])
    labels = np.stack([present, ~present, np.zeros(C, bool)])

    @jax.jit
    def pipeline(c, p):
        x = core.normalize(jnp, c, p)
        x_s = core.cvs(jnp, x, T, S, p)
        return core.ppmg_labels(jnp, x, x_s > 0.5, p), core.binary_probs(jnp, x_s, ALPHA)

    masks, probs = jax.vmap(pipeline)(cams, labels)
    assert masks.shape == (3, H, W) and probs.shape == (3, C, 2, H, W)
    for i in range(3):
        x = np_normalize(cams[i], labels[i], full_valid(), False)
        x_s = np_cvs(x.astype(np.float32), labels[i], T, S, full_valid())
        np.testing.assert_array_equal(np.asarray(masks[i]),
                                      np_ppmg(x, x_s > 0.5, labels[i], full_valid()))
