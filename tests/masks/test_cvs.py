"""pmm_jax.masks.core's CAM normalisation, coefficient of variation and CVS, on numpy and
jitted on jax.numpy (the ``core_xp`` fixture), against the numpy transcriptions of
``tests/support/pseudo_mask_reference.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmm_jax.masks import core
from tests.support.pseudo_mask_reference import (
    C, H, S, T, W, full_valid, np_cov, np_cvs, np_normalize, random_cams, random_normalized)


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("official_minmax", [False, True])
@pytest.mark.parametrize("use_valid", [False, True])
def test_normalize_matches_numpy(rng, present, valid, official_minmax, use_valid, core_xp):
    cams = random_cams(rng) - 0.3  # some negative values, min != 0
    mask = valid if use_valid else full_valid()
    got = core_xp.normalize(cams, present, mask if use_valid else None, official_minmax=official_minmax)
    want = np_normalize(cams, present, mask, official_minmax)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[~present] == 0)
    assert np.all(np.asarray(got)[:, ~mask] == 0)


def test_normalize_quirk_zeroes_before_shift(present, core_xp):
    cams = np.full((C, H, W), 2.0, np.float32)
    cams[:, 0, 0] = 1.0  # the minimum
    cams[:, 1, 1] = 3.0  # the maximum
    plain = np.asarray(core_xp.normalize(cams, present))
    quirk = np.asarray(core_xp.normalize(cams, present, official_minmax=True))
    assert plain[0, 0, 0] == 0 and quirk[0, 0, 0] == pytest.approx(-1.0 / (2.0 + 1e-5), rel=1e-6)
    np.testing.assert_allclose(plain[0, 1:], quirk[0, 1:])


def test_normalize_constant_cam_and_empty_label(present, core_xp):
    cams = np.full((C, H, W), 0.7, np.float32)
    assert np.all(np.asarray(core_xp.normalize(cams, present)) == 0)
    quirk = np.asarray(core_xp.normalize(cams, present, official_minmax=True))
    np.testing.assert_allclose(quirk, np_normalize(cams, present, full_valid(), True), rtol=1e-5)
    assert np.all(np.isfinite(quirk))
    empty = np.zeros(C, bool)
    assert np.all(np.asarray(core_xp.normalize(cams, empty)) == 0)
    assert np.all(np.asarray(core_xp.normalize(cams, present, np.zeros((H, W), bool))) == 0)


def test_normalize_cams_whose_range_overflows_float32(present, core_xp):
    """Finite CAM values near +-3e38 (their range overflows float32) normalise to [0, 1], not
    to an all-zero map (which made an all-background pseudo-mask); other classes unchanged."""
    cams = np.asarray(np.random.default_rng(0).uniform(0, 5, (C, H, W)), np.float32)
    cams[0, :, : W // 2], cams[0, :, W // 2:] = -3e38, 3e38
    cams[0, 0, 0] = 0.0
    out = np.asarray(core_xp.normalize(cams, np.ones(C, bool)))
    assert np.all(np.isfinite(out)) and out[0].min() == 0.0
    np.testing.assert_allclose(out[0, :, W // 2:], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(out[1:], np.asarray(core_xp.normalize(cams[1:], np.ones(C - 1, bool))))


# ------------------------------------------------------------------------------ CoV and CVS

@pytest.mark.parametrize("use_valid", [False, True])
def test_cov_and_cvs_match_numpy(rng, present, valid, use_valid, core_xp):
    mask = valid if use_valid else full_valid()
    x = random_normalized(rng, present, mask)
    arg = mask if use_valid else None
    np.testing.assert_allclose(
        np.asarray(core_xp.coefficient_of_variation(x, T, present, arg)),
        np_cov(x, present, T, mask), rtol=1e-5, atol=1e-7)
    got = np.asarray(core_xp.cvs(x, T, S, present, arg))
    np.testing.assert_allclose(got, np_cvs(x, present, T, S, mask), rtol=1e-5, atol=1e-6)
    assert np.all(got[:, ~mask] == 0)


def test_cov_edge_cases(present, core_xp):
    x = np.zeros((C, H, W), np.float32)
    x[0] = 0.04            # no pixel above t
    x[2] = 0.5             # constant above t: std 0
    x[3, :2] = [[0.2], [0.6]]  # two values above t
    x[1] = np.linspace(0, 1, H * W).reshape(H, W)  # absent
    cov = np.asarray(core_xp.coefficient_of_variation(x, T, present))
    want = [0.0, 0.0, 0.0, 0.2 / (0.4 + 1e-8)]
    np.testing.assert_allclose(cov, want, rtol=1e-5)
    # CVS: no pixel above t -> all zero; constant -> exponent 1 (unchanged).
    smoothed = np.asarray(core_xp.cvs(x, T, S, present))
    assert np.all(smoothed[0] == 0) and np.all(smoothed[1] == 0)
    np.testing.assert_allclose(smoothed[2], 0.5)


def test_cvs_threshold_is_inclusive_and_gradient_finite(rng, present, core_xp):
    x = random_normalized(rng, present, full_valid())
    x[0, 0, :3] = [T, 0.0, T - 1e-3]
    out = np.asarray(core_xp.cvs(x, T, S, present))
    assert out[0, 0, 0] > 0 and out[0, 0, 1] == 0 and out[0, 0, 2] == 0
    grad_fn = jax.jit(jax.grad(lambda v: jnp.sum(core.cvs(jnp, v, T, S, present))))
    assert np.all(np.isfinite(np.asarray(grad_fn(x))))
    const = np.full((C, H, W), 0.5, np.float32)  # std 0: sqrt'(0) must not leak
    assert np.all(np.isfinite(np.asarray(grad_fn(const))))


def test_cvs_large_scale_stays_finite(rng, present, core_xp):
    x = random_normalized(rng, present, full_valid())
    scale = 5.0
    assert np.any(1 - scale * np_cov(x, present, T, full_valid())[present] < 0)
    out = np.asarray(core_xp.cvs(x, T, scale, present))  # a negative exponent: 0 ** p = inf
    assert np.all(np.isfinite(out)) and np.all(out[x < T] == 0)
