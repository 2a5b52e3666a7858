"""``pmm_jax.data.builder_base``: what every dataset builder shares (labels from masks,
image decoding, mask checks naming the file)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pmm_jax.data import builder_base
from pmm_jax.data.builder_base import labels_from_mask
from tests.support.fake_trees import random_mask


def test_labels_from_mask():
    mask = np.array([[0, 2, 255], [5, 5, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(labels_from_mask(mask, 5), [0, 1, 0, 0, 1])
    assert labels_from_mask(mask, 5).dtype == np.float32


def test_mask_values_out_of_range_are_rejected():
    with pytest.raises(builder_base.InputError, match=r"'x'.*\[21, 40\]"):
        builder_base.check_mask(np.array([[0, 21], [40, 255]], np.uint8), (2, 2), "x", 20)


def test_label_png_must_be_lossless_and_16_bit_images_are_rescaled(tmp_path):
    """A JPEG saved as ``<id>.png`` or an RGB label is refused by name; a 16-bit greyscale
    image is rescaled to 8 bits (``convert("RGB")`` would clip it to 0 and 255)."""
    mask = random_mask((12, 16), seed=1)
    Image.fromarray(mask).save(tmp_path / "lossy.png", format="JPEG")
    Image.fromarray(np.stack([mask] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(builder_base.InputError, match=r"'a': .*lossy\.png is a JPEG file"):
        builder_base.read_png_mask(tmp_path / "lossy.png", "a")
    with pytest.raises(builder_base.InputError, match=r"'b': .*rgb\.png is a RGB image"):
        builder_base.read_png_mask(tmp_path / "rgb.png", "b")
    grey = np.random.default_rng(0).integers(0, 256, (5, 7)).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    image, size = builder_base.load_image(tmp_path / "deep.png", "c")
    assert size == (5, 7)
    np.testing.assert_array_equal(image, np.repeat(grey[:, :, None], 3, axis=2))
