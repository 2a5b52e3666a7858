"""pmm_jax.masks.rough_masks: the joint-CRF rough masks of a first run's CAMs (official
``infer_multi_scale --out_crf`` with alpha 24, posterior > 0.9) as label PNGs."""

import numpy as np
import pytest

from pmm_jax.cams import multicrop_tiling
from pmm_jax.files import io
from pmm_jax.masks import rough_masks


def square_image_and_cam(size=40):
    """A bright square on a dark, slightly noisy background, and a CAM peaking on it."""
    rng = np.random.default_rng(0)
    image = rng.integers(20, 40, (size, size, 3)).astype(np.uint8)
    image[10:30, 12:32] = 220
    yy, xx = np.mgrid[:size, :size]
    cam = np.exp(-(((yy - 20) / 8.0) ** 2 + ((xx - 22) / 8.0) ** 2)).astype(np.float32)
    return image, cam / cam.max()


def test_rough_mask_marks_confident_class_and_background():
    image, cam = square_image_and_cam()
    out = rough_masks.rough_mask(image, {2: cam})
    assert out.dtype == np.uint8 and out.shape == (40, 40)
    assert set(np.unique(out)) <= {0, 3, rough_masks.UNLABELLED}
    assert np.all(out[14:26, 16:28] == 3)  # inside the square: class 2 -> value 3
    assert np.all(out[:4, :4] == 0) and np.all(out[36:, 36:] == 0)  # far corners: background
    assert np.all(rough_masks.rough_mask(image, {}) == 0)  # no class: all background


def test_write_rough_masks_resumes_and_names_missing_cams(tmp_path):
    image, cam = square_image_and_cam()
    cam_dir, out_dir = tmp_path / "cams", tmp_path / "rough"
    io.write_cams(str(cam_dir / "a.npy"), {2: cam})
    io.write_cams(str(cam_dir / "b.npy"), {0: cam[::-1]})
    records = [("a", image), ("b", image[::-1])]
    assert rough_masks.write_rough_masks(records, str(cam_dir), str(out_dir)) == 2
    masks = multicrop_tiling.read_rough_masks(str(out_dir / "a.png"), 5)
    assert sorted(masks) == [2] and masks[2][20, 22]
    assert rough_masks.write_rough_masks(records, str(cam_dir), str(out_dir)) == 0  # skipped
    with pytest.raises(FileNotFoundError, match=r"cams/c\.npy for training image 'c'"):
        rough_masks.write_rough_masks(records + [("c", image)], str(cam_dir), str(out_dir))
    io.write_cams(str(cam_dir / "d.npy"), {1: cam[:30]})
    with pytest.raises(ValueError, match=r"d\.npy: class 1 CAM is 30x40 but the image is 40x40"):
        rough_masks.write_rough_masks([("d", image)], str(cam_dir), str(out_dir))
