"""pmm_jax.masks.worker: one image's mask in numpy (the core on the image's present classes,
unpadded, as the CPU workers run it), and the rough masks (official ``infer_multi_scale
--out_crf`` with alpha 24, posterior > 0.9)."""

import numpy as np
import pytest

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.masks import core, dense_crf, worker
from pmm_jax.masks.variants import VARIANTS
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


@pytest.mark.parametrize("quirk", [False, True])
def test_present_classes_only_equal_the_masked_form(quirk):
    """The workers' call (present classes only, no masks) gives the values of the padded,
    masked call the device makes, on the present classes."""
    cams = random_cams()
    padded = np.concatenate([cams, np.full_like(cams[:1], 7.0)])  # an absent class
    present = np.array([True, True, True, False])
    valid = np.ones(cams.shape[1:], bool)
    x = core.normalize(np, cams, official_minmax=quirk)
    np.testing.assert_array_equal(x, core.normalize(np, padded, present, valid, quirk)[:3])
    x_s = core.cvs(np, x, 0.05, 0.3)
    assert np.any(x_s != x)  # CVS changed something
    np.testing.assert_allclose(x_s, core.cvs(np, np.concatenate([x, x[:1]]), 0.05, 0.3, present,
                                             valid)[:3], rtol=1e-6)
    fg = x_s > 0.4
    labels = core.ppmg_labels(np, x, fg)
    np.testing.assert_array_equal(labels, core.ppmg_labels(
        np, np.concatenate([x, x[:1]]), np.concatenate([fg, fg[:1]]), present, valid))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def rough_settings():
    return worker.Settings(method="rough", variant=VARIANTS.get("rough"), alpha=24.0, t=0.05,
                           s=0.3, official_minmax=False, num_foreground=20, crf=dense_crf.PSEUDO_MASK_CRF,
                           backend="pydensecrf")


def test_rough_mask_marks_confident_class_and_background():
    image, cam = square_image_and_cam()
    out = worker.make_mask(image, [2], [cam], rough_settings())
    assert out.dtype == np.uint8 and out.shape == (40, 40)
    assert set(np.unique(out)) <= {0, 3, IGNORE_LABEL}
    assert np.all(out[14:26, 16:28] == 3)  # inside the square: class 2 -> value 3
    assert np.all(out[:4, :4] == 0) and np.all(out[36:, 36:] == 0)  # far corners: background
    assert np.all(worker.make_mask(image, [], [], rough_settings()) == 0)  # no class

