"""PMM's multi-crop training tiles as tf.data batches (the ``cls`` stage with
``cls.multicrop.rough_masks``): per example a scale, a tile whose rough-mask label passes the
10% rule, resized, flipped and normalised.

The tiling itself is numpy (``cams/multicrop_tiling.py``); the stream (shuffling, seeding
once, resuming at a step without decoding) is ``pipeline.stream``'s. docs/multicrop.md.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from pmm_jax.data.pipeline import (
    AUTOTUNE,
    Batch,
    batched,
    dataset_ids,
    normalize,
    stream,
)


def multicrop_train_batches(ds: tf.data.Dataset, *, rough_masks: str, batch_size: int,
                            crop_size: int, seed: int, num_foreground: int,
                            scales: tuple[float, ...], tile: int, stride: int,
                            flip: bool = True, shuffle_buffer: int | None = None,
                            start_step: int = 0) -> Iterator[Batch]:
    """Endless seeded batches of PMM's multi-crop training tiles (``VOC12ClsHeatCropDataset``
    with ``crop_scales``), a replacement for ``train_batches`` in the cls stage.

    Per example: its rough masks are read from the folder ``rough_masks``
    (``multicrop_tiling.read_rough_masks``); ``multicrop_tiling.sample_training_crop`` draws a scale of
    ``scales``, then tiles (``tile`` pixels ``stride`` apart at that scale) until the 10% rule
    leaves a positive label; the label is that rule's, restricted to the image-level label
    (a no-op for rough masks made from the image's own CAMs). The tile is cut from the
    original image, resized to ``crop_size`` square (bilinear, antialiased like PIL) and
    flipped with probability 1/2; the mask follows (nearest). Every training image must have
    a rough-mask file: the folder is checked up front (one pass over ``ds``) and the error
    names the missing files. Shuffling, seeding, resuming at ``start_step`` and batching as
    in ``train_batches``.
    """
    from pmm_jax.cams import multicrop_tiling

    num_labels = ds.element_spec["labels"].shape[-1]
    if num_labels != num_foreground:
        raise ValueError(f"dataset has {num_labels} image-level labels, expected {num_foreground}")
    paths = multicrop_tiling.rough_mask_paths(rough_masks, dataset_ids(ds))
    scales = tuple(float(s) for s in scales)

    def sample(image_id: bytes, image_shape: np.ndarray, labels: np.ndarray,
               position: np.int64) -> tuple[np.ndarray, np.ndarray]:
        path = paths[image_id.decode()]
        masks = multicrop_tiling.read_rough_masks(path, num_foreground)
        height, width = int(image_shape[0]), int(image_shape[1])
        for mask in masks.values():
            if mask.shape != (height, width):
                raise ValueError(f"{path}: rough mask is {mask.shape[0]}x{mask.shape[1]} but "
                                 f"its image is {height}x{width}")
        rng = np.random.default_rng((seed, int(position)))
        box, crop_labels = multicrop_tiling.sample_training_crop(
            masks, width, height, num_foreground, rng, scales, tile, stride)
        return np.asarray(box, np.int32), (crop_labels * (labels > 0.5)).astype(np.float32)

    def crop(position, example):
        box, labels = tf.numpy_function(
            sample, [example["id"], tf.shape(example["image"]), example["labels"], position],
            [tf.int32, tf.float32], stateful=False)
        box.set_shape((4,))
        labels.set_shape((num_foreground,))
        x1, y1, x2, y2 = tf.unstack(box)
        image = tf.image.resize(example["image"][y1:y2, x1:x2], (crop_size, crop_size),
                                method="bilinear", antialias=True)
        mask = tf.image.resize(tf.cast(example["mask"][y1:y2, x1:x2], tf.int32),
                               (crop_size, crop_size), method="nearest")[:, :, 0]
        key = tf.stack([tf.constant(seed, tf.int64), position])
        if flip and tf.random.stateless_uniform([], key) < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = normalize(image)
        image.set_shape((crop_size, crop_size, 3))
        mask.set_shape((crop_size, crop_size))
        return {"image": image, "mask": mask, "labels": labels, "id": example["id"]}

    ds = stream(ds, seed=seed, start=start_step * batch_size, shuffle_buffer=shuffle_buffer)
    return batched(ds.map(crop, num_parallel_calls=AUTOTUNE, deterministic=True), batch_size)
