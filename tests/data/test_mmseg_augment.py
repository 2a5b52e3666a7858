"""mmseg's segmentation training augmentation (mmseg_augment.mmseg_train_batches)."""

import numpy as np
import tensorflow as tf

from pmm_jax.constants import IMAGENET_MEAN_UNIT, IMAGENET_STD_UNIT
from pmm_jax.data import mmseg_augment


def _dataset(height=40, width=60, num=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, height, width, 3), dtype=np.uint8)
    masks = np.zeros((num, height, width, 1), np.uint8)
    masks[:, :, width // 2:] = 1
    masks[:, :4] = 255
    return tf.data.Dataset.from_tensor_slices(dict(
        image=images, mask=masks, labels=np.ones((num, 2), np.float32),
        id=np.array([f"{i}".encode() for i in range(num)])))


def test_batches_are_static_padded_and_reproducible():
    kwargs = dict(batch_size=4, crop_size=48, seed=3, img_scale=(96, 32), ratio_range=(0.5, 2.0))
    a = next(mmseg_augment.mmseg_train_batches(_dataset(), **kwargs))
    b = next(mmseg_augment.mmseg_train_batches(_dataset(), **kwargs))
    assert a["image"].shape == (4, 48, 48, 3) and a["mask"].shape == (4, 48, 48)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert set(np.unique(a["mask"])) <= {0, 1, 255}
    raw = a["image"] * np.array(IMAGENET_STD_UNIT) * 255 + np.array(IMAGENET_MEAN_UNIT) * 255
    valid = a["mask"] != 255
    assert raw[valid].min() > -0.5 and raw[valid].max() < 255.5  # photometric stays in 0..255
    # Small rescales leave less than the crop: padded with ignore.
    assert (a["mask"] == 255).any()


def test_crop_box_avoids_a_dominant_class():
    """Left half class 0, right half class 1: a box is kept only when neither class fills 3/4
    of it; with 10 redraws nearly every crop straddles the border (a plain crop would in
    about half of the draws)."""
    mask = tf.constant(np.repeat([[0] * 32 + [1] * 32], 32, axis=0), tf.int32)
    balanced = 0
    for s in range(20):
        top, left, h, w = mmseg_augment._mmseg_crop_box(mask, tf.constant([s, 7], tf.int64), 32, 0.75)
        box = mask.numpy()[top:top + h, left:left + w]
        balanced += max(box.mean(), 1 - box.mean()) < 0.75
    assert balanced >= 18
