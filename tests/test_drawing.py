"""Tests of pmm_jax.drawing."""

import os

import numpy as np

from pmm_jax import drawing
from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD, PALETTE, SYNTHETIC_CLASSES
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir


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


def test_strip_pads_heights_and_separates_with_white():
    a, b = np.zeros((4, 3, 3), np.uint8), np.zeros((2, 5, 3), np.uint8)
    out = drawing.strip([a, b], gap=2)
    assert out.shape == (4, 10, 3)
    assert (out[:, 3:5] == 255).all() and (out[2:, 5:] == 255).all() and (out[:2, 5:] == 0).all()


def test_cam_and_cvs_pictures_per_class():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    cams = {c: rng.random((12, 10)).astype(np.float32) for c in (3, 0)}
    names = SYNTHETIC_CLASSES
    pictures = drawing.cam_pictures(image, cams, names)
    assert list(pictures) == [names[1], names[4]]
    assert all(p.shape == image.shape and p.dtype == np.uint8 for p in pictures.values())
    cvs = drawing.cvs_pictures(image, cams, names, t=0.05, s=0.3)
    assert list(cvs) == list(pictures)
    for pair in cvs.values():
        assert pair["before"].shape == pair["after"].shape == image.shape
        assert not np.array_equal(pair["before"], pair["after"])  # CVS flattens a random CAM
    assert drawing.cvs_pictures(image, {}, names, t=0.05, s=0.3) == {}


def test_mask_pictures_show_the_masks_that_exist(tmp_path):
    wd = Workdir(str(tmp_path))
    safe_io.write_mask(os.path.join(wd.pseudo_masks("ppmg"), "a.png"), np.full((3, 4), 2, np.uint8))
    safe_io.write_mask(os.path.join(wd.predictions("ce", "val"), "a.png"),
                       np.ones((3, 4), np.uint8))
    gt = np.zeros((3, 4), np.uint8)
    out = drawing.mask_pictures(wd.root, "a", gt, split="val", runs=("ce", "pus"))
    assert list(out) == ["pseudo/ppmg", "prediction/ce", "ground truth"]  # no baseline, no pus
    assert (out["pseudo/ppmg"] == PALETTE[2]).all() and (out["ground truth"] == PALETTE[0]).all()
