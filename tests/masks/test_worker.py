"""pmm_jax.masks.worker: the numpy steps of one image against the jitted reference core
(masks/cvs.py, masks/ppmg.py), and the rough masks (official ``infer_multi_scale --out_crf``
with alpha 24, posterior > 0.9)."""

import numpy as np
import pytest

from pmm_jax.cams import multicrop_tiling
from pmm_jax.masks import cvs, dense_crf, ppmg, worker
from tests.support.crf_scenes import square_image_and_cam


def random_cams(seed=0, k=3, shape=(24, 31)):
    """Smooth, non-negative CAMs with different ranges per class (one nearly empty)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    cams = []
    for c in range(k):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(20, 80))
        cams.append(rng.uniform(0.2, 3.0) * bump + np.abs(rng.normal(0, 0.02, shape)) + 0.1 * c)
    return np.stack(cams).astype(np.float32)


@pytest.mark.parametrize("minmax", [False, True])
def test_numpy_core_matches_the_jitted_reference(minmax):
    cams = random_cams()
    present = np.ones(len(cams), bool)
    x = worker.normalize(cams, minmax)
    np.testing.assert_allclose(x, cvs.normalize(cams, present, official_minmax=minmax), atol=1e-6)
    x_s = worker.cvs(x, 0.05, 0.3)
    np.testing.assert_allclose(x_s, cvs.cvs(x, present, 0.05, 0.3), rtol=1e-5, atol=1e-6)
    assert np.any(x_s != x)  # CVS changed something
    np.testing.assert_allclose(np.stack(worker.binary_probs(x_s, 11.0)),
                               ppmg.binary_probs(x_s, 11.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(worker.joint_probs(x_s, 11.0),
                               ppmg.baseline_probs(x_s, present, 11.0), rtol=1e-5, atol=1e-7)
    fg = x_s > 0.4
    labels = worker.ppmg_labels(x, fg)
    np.testing.assert_array_equal(labels, ppmg.ppmg_labels(x, fg, present))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_normalize_cams_whose_range_overflows_float32_as_the_jitted_reference():
    """Finite values near +-3e38 (a range that overflows float32) normalise to [0, 1] as in
    ``cvs.normalize``, not to an all-zero class (an all-background mask)."""
    cams = random_cams()
    cams[0, :, : cams.shape[2] // 2], cams[0, :, cams.shape[2] // 2:] = -3e38, 3e38
    x = worker.normalize(cams)
    assert np.all(np.isfinite(x)) and x[0].max() == pytest.approx(1.0)
    np.testing.assert_allclose(x, cvs.normalize(cams, np.ones(len(cams), bool)), atol=1e-6)


def rough_settings():
    return worker.Settings("rough", 24.0, 0.05, 0.3, False, 20, dense_crf.PSEUDO_MASK_CRF,
                           "pydensecrf")


def test_rough_mask_marks_confident_class_and_background():
    image, cam = square_image_and_cam()
    out = worker.make_mask(image, [2], [cam], rough_settings())
    assert out.dtype == np.uint8 and out.shape == (40, 40)
    assert set(np.unique(out)) <= {0, 3, worker.UNLABELLED}
    assert np.all(out[14:26, 16:28] == 3)  # inside the square: class 2 -> value 3
    assert np.all(out[:4, :4] == 0) and np.all(out[36:, 36:] == 0)  # far corners: background
    assert np.all(worker.make_mask(image, [], [], rough_settings()) == 0)  # no class
    assert worker.ROUGH_THRESHOLD == multicrop_tiling.ROUGH_MASK_THRESHOLD
