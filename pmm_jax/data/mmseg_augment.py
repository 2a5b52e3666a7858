"""mmseg's segmentation training augmentation in tf.data (the official PSPNet recipe for VOC
and COCO, ``config.seg.augment = "mmseg"``): resize to a random ratio of ``img_scale``, random
crop with ``cat_max_ratio``, flip, photometric distortion, normalise, pad.

An alternative to ``pipeline.train_batches``' light augmentation; the stream (shuffling,
seeding once, resuming at a step without decoding) is ``pipeline.stream``'s. The official
steps and where they differ: docs/fidelity.md.
"""

from __future__ import annotations

from typing import Iterator

import tensorflow as tf

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.data.pipeline import (AUTOTUNE, Batch, batched, normalize, pad_bottom_right,
                                   stream)


def _mmseg_rescale(image, mask, ratio, img_scale):
    """mmseg ``Resize(img_scale, ratio_range)`` with keep_ratio: the long / short edges fit
    ``ratio * img_scale`` (sizes rounded as mmcv); bilinear image, nearest mask."""
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    long_edge, short_edge = max(img_scale) * ratio, min(img_scale) * ratio
    factor = tf.minimum(long_edge / tf.reduce_max(size), short_edge / tf.reduce_min(size))
    new_size = tf.cast(size * factor + 0.5, tf.int32)
    return (tf.image.resize(image, new_size, method="bilinear"),
            tf.image.resize(mask, new_size, method="nearest"))

def _mmseg_crop_box(mask, seed, crop_size: int, cat_max_ratio: float):
    """mmseg ``RandomCrop``: up to 10 boxes are redrawn while one class (ignore excluded)
    fills ``>= cat_max_ratio`` of the box or it holds a single class; then the 11th is taken."""
    shape = tf.shape(mask)
    box_h, box_w = tf.minimum(shape[0], crop_size), tf.minimum(shape[1], crop_size)
    tops = tf.random.stateless_uniform([11], seed, 0, shape[0] - box_h + 1, dtype=tf.int32)
    lefts = tf.random.stateless_uniform([11], seed + 1, 0, shape[1] - box_w + 1, dtype=tf.int32)

    def acceptable(i):
        box = mask[tops[i]:tops[i] + box_h, lefts[i]:lefts[i] + box_w]
        counts = tf.math.bincount(tf.reshape(box, [-1]), minlength=IGNORE_LABEL + 1)[:IGNORE_LABEL]
        total = tf.reduce_sum(counts)
        return tf.logical_and(tf.math.count_nonzero(counts) > 1,
                              tf.cast(tf.reduce_max(counts), tf.float32)
                              < cat_max_ratio * tf.cast(total, tf.float32))

    ok = tf.map_fn(acceptable, tf.range(10), fn_output_signature=tf.bool)
    index = tf.cond(tf.reduce_any(ok), lambda: tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32),
                    lambda: tf.constant(10))
    return tops[index], lefts[index], box_h, box_w

def _photometric_distortion(image, seed):
    """mmseg ``PhotoMetricDistortion`` on RGB 0..255: brightness +-32, contrast 0.5-1.5 (before
    or after the colour steps, at random), saturation 0.5-1.5, hue +-18 (OpenCV units of
    2 degrees); each applied with probability 1/2, clipped to 0..255 and truncated to integers
    after each step as mmcv does on uint8 images."""
    keys = tf.unstack(tf.random.experimental.stateless_split(seed, 9))
    coin = lambda k: tf.random.stateless_uniform([], k) < 0.5  # noqa: E731
    clip = lambda x: tf.floor(tf.clip_by_value(x, 0.0, 255.0))  # noqa: E731

    def maybe(key, value_key, low, high, fn, x):
        value = tf.random.stateless_uniform([], value_key, low, high)
        return tf.cond(coin(key), lambda: clip(fn(x, value)), lambda: x)

    contrast = lambda x, k: maybe(k[0], k[1], 0.5, 1.5, lambda y, a: y * a, x)  # noqa: E731
    x = maybe(keys[0], keys[1], -32.0, 32.0, lambda y, b: y + b, image)
    contrast_first = coin(keys[2])
    x = tf.cond(contrast_first, lambda: contrast(x, keys[3:5]), lambda: x)
    x = maybe(keys[5], keys[6], 0.5, 1.5,
              lambda y, a: tf.image.adjust_saturation(y / 255.0, a) * 255.0, x)
    hue = tf.floor(tf.random.stateless_uniform([], keys[7], -18.0, 18.0))  # randint(-18, 18)
    x = tf.cond(coin(keys[8]), lambda: clip(tf.image.adjust_hue(x / 255.0, hue / 180.0) * 255.0),
                lambda: x)
    return tf.cond(contrast_first, lambda: x, lambda: contrast(x, keys[3:5]))

def _mmseg_augment(example, seed, *, crop_size: int, img_scale, ratio_range, cat_max_ratio):
    """mmseg's VOC/COCO training transform of one example (see ``mmseg_train_batches``)."""
    keys = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = tf.cast(example["image"], tf.float32)
    mask = tf.cast(example["mask"], tf.int32)  # [H, W, 1]
    ratio = tf.random.stateless_uniform([], keys[0], *ratio_range)
    image, mask = _mmseg_rescale(image, mask, ratio, img_scale)
    image, mask = tf.floor(tf.clip_by_value(image + 0.5, 0.0, 255.0)), mask[:, :, 0]
    top, left, box_h, box_w = _mmseg_crop_box(mask, keys[1], crop_size, cat_max_ratio)
    image = image[top:top + box_h, left:left + box_w]
    mask = mask[top:top + box_h, left:left + box_w]
    if tf.random.stateless_uniform([], keys[2]) < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = normalize(_photometric_distortion(image, keys[3]))
    image = pad_bottom_right(image, crop_size, crop_size)
    mask = pad_bottom_right(mask, crop_size, crop_size, IGNORE_LABEL)
    image.set_shape((crop_size, crop_size, 3))
    mask.set_shape((crop_size, crop_size))
    return {"image": image, "mask": mask, "labels": example["labels"], "id": example["id"]}

def mmseg_train_batches(ds: tf.data.Dataset, *, batch_size: int, crop_size: int, seed: int,
                        img_scale: tuple[int, int] = (2048, 512),
                        ratio_range: tuple[float, float] = (0.5, 2.0),
                        cat_max_ratio: float = 0.75,
                        shuffle_buffer: int | None = None, start_step: int = 0
                        ) -> Iterator[Batch]:
    """Endless seeded training batches with mmseg's segmentation augmentation (the official
    PSPNet recipe for VOC and COCO), an alternative to ``train_batches``' light one.

    Per example: resize so the edges fit ``ratio * img_scale`` (ratio uniform in
    ``ratio_range``, aspect kept), random crop of at most ``crop_size`` with ``cat_max_ratio``
    (redrawn while one class dominates), horizontal flip with probability 1/2, photometric
    distortion, normalisation, padding to ``crop_size`` (image 0, mask 255). Shuffling,
    seeding, resuming at ``start_step`` and batching as in ``train_batches``.
    """

    def augment(position, example):
        key = tf.stack([tf.constant(seed, tf.int64), position])
        return _mmseg_augment(example, key, crop_size=crop_size, img_scale=tuple(img_scale),
                              ratio_range=tuple(ratio_range), cat_max_ratio=cat_max_ratio)

    ds = stream(ds, seed=seed, start=start_step * batch_size, shuffle_buffer=shuffle_buffer)
    return batched(ds.map(augment, num_parallel_calls=AUTOTUNE, deterministic=True), batch_size)
