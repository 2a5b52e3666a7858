"""Tests of pmm_jax.drawing."""

import numpy as np

from pmm_jax import drawing
from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD, PALETTE


def test_denormalize_inverts_imagenet_normalisation():
    raw = np.random.randint(0, 256, (4, 5, 3)).astype(np.uint8)
    normalised = (raw - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_array_equal(drawing.denormalize(normalised), raw)


def test_colorize_mask_uses_the_palette():
    mask = np.array([[0, 1], [255, 15]])
    np.testing.assert_array_equal(drawing.colorize_mask(mask)[1, 1], PALETTE[15])


def test_heatmap_ends():
    ramp = drawing.heatmap(np.array([[0.0, 1.0, 2.0]]))
    np.testing.assert_array_equal(ramp[0, 0], [0, 0, 128])
    np.testing.assert_array_equal(ramp[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(ramp[0, 2], [255, 0, 0])


def test_cam_overlay_batch_shows_only_present_classes():
    images = np.zeros((2, 8, 8, 3))
    cams = np.zeros((2, 2, 2, 3))
    cams[:, 0, 0, 2] = 1.0  # strong CAM of class 2 only
    labels = np.array([[0, 0, 1], [1, 0, 0]])
    out = drawing.cam_overlay_batch(images, cams, labels)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    assert out[0].reshape(-1, 3).std(0).max() > 0  # class 2 present: a visible hot spot
    assert out[1].reshape(-1, 3).std(0).max() == 0  # class 2 absent: flat picture
