"""The permutohedral lattice (``pmm_jax.masks.permutohedral``): linearity and densecrf's
symmetric normalisation, the approximation of the exact Gaussian filter, and overflow reports,
on the dense CRF's own Gaussian (d = 2) and bilateral (d = 5) features of a small scene."""

import numpy as np
import pytest

from pmm_jax.masks import dense_crf_jax, permutohedral
from tests.support.crf_scenes import synthetic_scene


def lattice_cases():
    """Small feature sets: a Gaussian pixel grid (d=2) and bilateral features (d=5)."""
    image, _ = synthetic_scene(20, 24, seed=1)
    return {
        "gauss2": np.asarray(dense_crf_jax.gaussian_features(20, 24, 2.0)),
        "bilateral5": np.asarray(dense_crf_jax.bilateral_features(image, 4.0, 15.0)),
    }


@pytest.fixture(scope="module")
def lattices():
    """Each case's features and its lattice at the hard capacity bound."""
    return {name: (f, permutohedral.build_lattice(f, (f.shape[1] + 1) * f.shape[0]))
            for name, f in lattice_cases().items()}


@pytest.mark.parametrize("case", ["gauss2", "bilateral5"])
def test_constant_signal(lattices, case):
    """Splat-blur-slice is linear, K 1 > 0, and 1 / norm is a fixed point of the normalised
    kernel (norm * K(norm / norm) = norm * K 1 = 1 / norm), as densecrf's symmetric scheme."""
    features, lattice = lattices[case]
    n = features.shape[0]
    ones = np.ones((n, 1), np.float32)
    k1 = np.asarray(permutohedral.lattice_filter(lattice, ones))[:, 0]
    kc = np.asarray(permutohedral.lattice_filter(lattice, np.full((n, 2), 3.5, np.float32)))
    assert np.all(k1 > 0)
    np.testing.assert_allclose(kc, np.repeat(3.5 * k1[:, None], 2, axis=1), rtol=1e-5)
    inverse_norm = 1.0 / np.asarray(lattice.norm)
    fixed = np.asarray(permutohedral.normalized_filter(lattice, inverse_norm[:, None]))[:, 0]
    np.testing.assert_allclose(fixed, inverse_norm, rtol=1e-4)
    assert not bool(lattice.overflow)


@pytest.mark.parametrize("case, min_corr, max_rel", [
    ("gauss2", 0.995, 0.03), ("bilateral5", 0.93, 0.12)])
def test_approximates_brute_force_gaussian(lattices, case, min_corr, max_rel):
    """The lattice filter approximates sum_j exp(-|f_i - f_j|^2 / 2) v_j up to a constant
    (correlation, and relative error after the best scale; the approximation is coarser in
    5-D than on the 2-D grid)."""
    features, lattice = lattices[case]
    values = np.random.default_rng(2).random((features.shape[0], 2)).astype(np.float32)
    approx = np.asarray(permutohedral.lattice_filter(lattice, values))
    sq_dist = ((features[:, None] - features[None]) ** 2).sum(-1)
    exact = np.exp(-0.5 * sq_dist) @ values
    scale = (approx * exact).sum() / (exact * exact).sum()
    correlation = np.corrcoef(approx.ravel(), exact.ravel())[0, 1]
    relative = np.abs(approx - scale * exact).mean() / np.abs(scale * exact).mean()
    assert correlation >= min_corr
    assert relative <= max_rel


def test_overflow_is_detected(lattices):
    """A table smaller than the lattice reports the true point count; keys beyond 16 bits are
    reported."""
    features, full = lattices["bilateral5"]
    small = permutohedral.build_lattice(features, 64)
    assert int(small.num_points) == int(full.num_points) > 64
    assert bool(small.overflow)
    huge = permutohedral.build_lattice(features * 1e4, features.shape[0] * 6)
    assert not bool(huge.keys_in_range) and bool(huge.overflow)
