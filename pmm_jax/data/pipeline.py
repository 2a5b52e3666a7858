"""tf.data input pipelines: per-process shards, train batches and padded eval batches.

Everything a jitted step receives has a static shape: train batches are cropped to a fixed
size and drop the remainder; eval batches pad every image to one size and pad the last batch
with rows marked ``valid=False``, so a compiled eval step never retraces. Batches are dicts of
numpy arrays with the keys of ``docs/design.md``:

* ``image`` float32 ``[B, H, W, 3]``, ImageNet mean/std normalised (padding is 0, i.e. the
  mean colour, as in mmseg/SEAM where padding follows normalisation);
* ``labels`` float32 ``[B, C]`` multi-hot; ``mask`` int32 ``[B, H, W]`` with 255 = ignore
  (boundaries and padding); ``id`` bytes ``[B]``;
* eval only: ``raw`` uint8 ``[B, H, W, 3]`` (the unnormalised padded image, for the CRF),
  ``valid`` bool ``[B]``, ``height``/``width`` int32 ``[B]`` (the unpadded size).

Examples inside ``tf.data`` keep the tfds layout: ``image`` uint8 ``[H, W, 3]``, ``mask``
uint8 ``[H, W, 1]``, ``labels`` float32 ``[C]``, ``id`` string.

Multi-host: :func:`load_split` gives each process a contiguous, disjoint shard
(``tfds.even_splits``; shard sizes differ by at most one). Eval on every process must run the
same number of steps, so :func:`eval_batches` pads each shard with invalid rows to the
largest shard's size: the maximum of the per-process example counts (all-gathered across
processes), or ``num_rows`` given by the caller, e.g. :func:`rows_per_process`, which
computes it from the split's example count without communicating.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from pmm_jax.constants import IGNORE_LABEL, IMAGENET_MEAN_UNIT, IMAGENET_STD_UNIT
from pmm_jax.data import coco, synthetic, voc  # noqa: F401  (registers the datasets)
from pmm_jax.data.builder_base import prepare
from pmm_jax.files.safe_io import read_mask

try:
    # TensorFlow only feeds the host; the accelerators belong to JAX.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:
    pass  # TF was initialised before this import; it then already has its devices.

AUTOTUNE = tf.data.AUTOTUNE
_MAX_LISTED_MISSING = 5

Batch = dict[str, np.ndarray]


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def load_split(name: str, split: str, data_dir: str, *, process_index: int | None = None,
               process_count: int | None = None, decode: bool = True) -> tf.data.Dataset:
    """This process's shard of tfds ``name``/``split``, in a deterministic order.

    ``name`` is any dataset of this project (``synthetic_wsss/<config>``, ``voc2012_wsss``,
    ``coco2014_wsss/<config>``); ``synthetic_wsss`` is generated into ``data_dir`` on first
    use, the others must have been prepared (see ``builder_base.prepare``). The shard defaults
    to ``jax.process_index()`` of ``jax.process_count()``. With ``decode=False`` ``image``
    and ``mask`` stay encoded (string tensors) for the training streams, which decode after
    shuffling and skipping (:func:`decode`), so a resumed run skips without decoding.
    """
    index, count = _process(process_index, process_count)
    builder = prepare(name, data_dir)
    decoders = ({"image": decode_image_as_pil()} if decode else
                {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
    return builder.as_dataset(split=tfds.even_splits(split, n=count)[index], shuffle_files=False,
                              decoders=decoders)


@tfds.decode.make_decoder(output_dtype=tf.uint8)
def decode_image_as_pil(serialized: tf.Tensor, feature: tfds.features.Image) -> tf.Tensor:
    """Decodes a stored image to uint8 RGB exactly as PIL (``safe_io.read_image``) does.

    JPEGs (VOC and COCO keep their original bytes) use libjpeg's accurate integer DCT,
    PIL's and libjpeg's default; TensorFlow's default (tfds's decoder), the fast integer DCT,
    changes most pixels of a VOC photograph by up to ~18 levels, which moved 658 of 4.3M
    PPMG pseudo-mask pixels between the pipeline and ``python -m pmm_jax.pseudo_masks`` (which
    reads the JPEG files with PIL, like the official code). PNGs decode identically either way.
    """
    image = _decode_rgb(serialized)
    image.set_shape(feature.shape)
    return image


def _decode_rgb(serialized: tf.Tensor) -> tf.Tensor:
    """uint8 ``[H, W, 3]`` from JPEG (PIL's accurate DCT) or PNG bytes."""
    return tf.cond(
        tf.io.is_jpeg(serialized),
        lambda: tf.io.decode_jpeg(serialized, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(serialized, channels=3, expand_animations=False))


def decode(example: dict) -> dict:
    """An example of ``load_split(..., decode=False)`` decoded as ``load_split`` decodes it:
    ``image`` as PIL does, ``mask`` from its PNG or, when :func:`with_masks_from_dir` joined
    one (``mask_file``), from that file, checked. Decoded fields pass through unchanged."""
    example = dict(example)
    if example["image"].dtype == tf.string:
        example["image"] = _decode_rgb(example["image"])
        example["image"].set_shape((None, None, 3))
    if "mask_file" in example:
        mask = tf.numpy_function(_read_joined_mask,
                                 [example.pop("mask_file"), example.pop("mask_classes"),
                                  example["id"], tf.shape(example["image"])],
                                 tf.uint8, stateful=False)
        mask.set_shape((None, None, 1))
        example["mask"] = mask
    elif example["mask"].dtype == tf.string:
        example["mask"] = tf.io.decode_image(example["mask"], channels=1, expand_animations=False)
        example["mask"].set_shape((None, None, 1))
    return example


def num_examples(name: str, split: str, data_dir: str) -> int:
    """Number of examples in the whole split (all processes together)."""
    return prepare(name, data_dir).info.splits[split].num_examples


def rows_per_process(name: str, split: str, data_dir: str, *,
                     process_count: int | None = None) -> int:
    """The largest per-process shard of the split: the rows :func:`eval_batches` pads to."""
    count = jax.process_count() if process_count is None else process_count
    splits = prepare(name, data_dir).info.splits
    return max(splits[shard].num_examples for shard in tfds.even_splits(split, n=count))


def dataset_ids(ds: tf.data.Dataset) -> list[str]:
    """The ids of ``ds`` in order (one pass over the dataset)."""
    return [image_id.decode() for image_id in ds.map(lambda e: e["id"]).as_numpy_iterator()]


def _check_class_ids(mask: np.ndarray, num_classes: int, path: str) -> None:
    """ValueError naming ``path`` if ``mask`` has ids >= ``num_classes`` besides the ignore label."""
    ids = np.unique(mask)
    bad = ids[(ids >= num_classes) & (ids != IGNORE_LABEL)]
    if bad.size:
        raise ValueError(f"{path} holds class ids {bad.tolist()} outside 0..{num_classes - 1} "
                         f"(and {IGNORE_LABEL} = ignore): it belongs to another dataset or is "
                         "corrupt")


def with_masks_from_dir(ds: tf.data.Dataset, mask_dir: str, *, producer: str,
                        num_classes: int | None = None) -> tf.data.Dataset:
    """Replaces each example's ``mask`` with the label PNG ``mask_dir/<id>.png``.

    Every id's file is checked up front (one pass over ``ds``, which decodes its examples
    once): missing files raise FileNotFoundError with their count and the first paths, naming
    ``producer``, the stage that writes them (e.g. "the 'pseudo' stage"). PNGs are read with
    PIL because ``tf.io.decode_png`` expands palette PNGs to RGB instead of returning the label
    indices. A mask whose size differs from its image fails when read, naming the id; with
    ``num_classes`` (background included), so does a mask holding a class id outside
    ``0..num_classes-1`` other than the ignore label, naming the file and the ids. On an
    encoded dataset (``load_split(..., decode=False)``) the files are only named here and
    read by :func:`decode`, after a training stream has skipped what a resumed run consumed.
    """
    ids = dataset_ids(ds)
    missing = [path for path in (os.path.join(mask_dir, f"{image_id}.png") for image_id in ids)
               if not os.path.exists(path)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED_MISSING])
        raise FileNotFoundError(
            f"{len(missing)} of {len(ids)} masks are missing from {mask_dir} (first: {listed}). "
            f"They are written by {producer}; run it first.")

    def join(example):
        path = tf.strings.join([mask_dir, os.sep, example["id"], ".png"])
        joined = {**example, "mask_file": path, "mask_classes": tf.constant(num_classes or 0)}
        del joined["mask"]
        return joined

    joined = ds.map(join)
    if ds.element_spec["image"].dtype == tf.string:
        return joined  # encoded: the training stream reads the masks when it decodes (decode)

    def replace(example):
        mask = decode(example)["mask"]
        mask.set_shape(example["image"].shape[:2] + (1,))
        return {**{k: v for k, v in example.items() if k not in ("mask_file", "mask_classes")},
                "mask": mask}

    return joined.map(replace, num_parallel_calls=AUTOTUNE, deterministic=True)


def _read_joined_mask(path: bytes, num_classes: np.int32, image_id: bytes,
                      image_shape: np.ndarray) -> np.ndarray:
    """The label PNG ``path`` joined by :func:`with_masks_from_dir` as ``[H, W, 1]``, checked
    against its image's size and, when ``num_classes`` > 0, the class ids."""
    path, image_id = path.decode(), image_id.decode()
    mask = read_mask(path)
    if num_classes > 0:
        _check_class_ids(mask, int(num_classes), path)
    if mask.shape != tuple(image_shape[:2]):
        raise ValueError(f"mask of {image_id!r} in {os.path.dirname(path)} is "
                         f"{mask.shape[0]}x{mask.shape[1]} but its image is "
                         f"{image_shape[0]}x{image_shape[1]}")
    return mask[:, :, None]


def normalize(image: tf.Tensor) -> tf.Tensor:
    """RGB in 0..255 (any dtype) -> float32 ImageNet-normalised."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(IMAGENET_MEAN_UNIT)) / tf.constant(IMAGENET_STD_UNIT)


def pad_bottom_right(x: tf.Tensor, height, width, value=0) -> tf.Tensor:
    """Pads ``x`` [h, w, ...] at the bottom/right to [height, width, ...] with ``value``."""
    shape = tf.shape(x)
    paddings = [[0, height - shape[0]], [0, width - shape[1]]] + [[0, 0]] * (x.shape.rank - 2)
    return tf.pad(x, paddings, constant_values=tf.cast(value, x.dtype))


def _augment(example, seed: tf.Tensor, *, crop_size: int, flip: bool,
             scale_range: tuple[float, float] | None):
    """Random scale, pad, random crop and flip of one example, keeping image and mask aligned."""
    scale_seed, crop_y_seed, crop_x_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    image = example["image"]
    mask = tf.cast(example["mask"], tf.int32)  # [H, W, 1]
    if scale_range is not None:
        scale = tf.random.stateless_uniform([], scale_seed, *scale_range)
        size = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * scale), tf.int32)
        image = tf.image.resize(image, size, method="bilinear")
        mask = tf.image.resize(mask, size, method="nearest")
    image = normalize(image)
    mask = mask[:, :, 0]

    shape = tf.shape(mask)
    height, width = tf.maximum(shape[0], crop_size), tf.maximum(shape[1], crop_size)
    image = pad_bottom_right(image, height, width)
    mask = pad_bottom_right(mask, height, width, IGNORE_LABEL)
    top = tf.random.stateless_uniform([], crop_y_seed, 0, height - crop_size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], crop_x_seed, 0, width - crop_size + 1, dtype=tf.int32)
    image = image[top:top + crop_size, left:left + crop_size]
    mask = mask[top:top + crop_size, left:left + crop_size]
    if flip and tf.random.stateless_uniform([], flip_seed) < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image.set_shape((crop_size, crop_size, 3))
    mask.set_shape((crop_size, crop_size))
    return {"image": image, "mask": mask, "labels": example["labels"], "id": example["id"]}


def _cardinality(ds: tf.data.Dataset) -> int:
    """Number of elements; counted by iterating when tf.data cannot tell (e.g. after filter)."""
    count = int(ds.cardinality())
    if count >= 0:
        return count
    if count == tf.data.INFINITE_CARDINALITY:
        raise ValueError("expected a finite dataset")
    return len(dataset_ids(ds))


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """The shuffle seed of ``epoch``: a function of (``seed``, ``epoch``) only."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def stream(ds: tf.data.Dataset, *, seed: int, start: int = 0,
           shuffle_buffer: int | None = None) -> tf.data.Dataset:
    """``(position, example)`` for the positions ``start, start + 1, ...`` of the endless
    training stream of ``ds``, decoded (:func:`decode`).

    Epoch ``e`` (positions ``e*n .. e*n+n-1``, ``n`` = the shard's size) is ``ds`` shuffled
    with a seed drawn from (``seed``, ``e``) alone, so the stream from ``start`` is exactly
    the tail of the stream from 0: a resumed run sees the batches an uninterrupted one would.
    Reaching ``start`` costs whole epochs nothing and the rest of its epoch one pass through
    the shuffle buffer before decoding (give an encoded ``load_split(..., decode=False)``
    dataset, so skipping reads but never decodes images). ``shuffle_buffer`` defaults to the
    whole shard.
    """
    n = _cardinality(ds)
    buffer = shuffle_buffer or n
    first_epoch, skip = divmod(start, n)

    def epoch(e):
        positions = tf.data.Dataset.range(e * n, (e + 1) * n)
        shuffled = ds.shuffle(buffer, seed=_epoch_seed(seed, e), reshuffle_each_iteration=False)
        return tf.data.Dataset.zip(positions, shuffled)

    epochs = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch).skip(skip)
    return epochs.map(lambda position, example: (position, decode(example)),
                      num_parallel_calls=AUTOTUNE, deterministic=True)


def batched(ds: tf.data.Dataset, batch_size: int) -> Iterator[Batch]:
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE).as_numpy_iterator()


def train_batches(ds: tf.data.Dataset, *, batch_size: int, crop_size: int, seed: int,
                  num_foreground: int, flip: bool = True,
                  scale_range: tuple[float, float] | None = (0.9, 1.1),
                  shuffle_buffer: int | None = None, start_step: int = 0) -> Iterator[Batch]:
    """Endless, seeded, augmented training batches of this process's shard, from batch
    ``start_step`` on.

    Shuffles (a new order every epoch, deterministic given ``seed``; :func:`stream`), repeats,
    then per example: random scale in ``scale_range`` (bilinear image, nearest mask),
    normalise, pad to at least ``crop_size`` (image 0, mask 255), random ``crop_size`` square
    crop, random horizontal flip. Augmentation randomness is derived from (seed, example
    position), so the stream is reproducible and one resumed at ``start_step`` yields exactly
    the batches ``start_step, start_step + 1, ...`` of an uninterrupted one. ``batch_size``
    is per process; the remainder is dropped. ``shuffle_buffer`` defaults to the whole shard.
    """
    num_labels = ds.element_spec["labels"].shape[-1]
    if num_labels != num_foreground:
        raise ValueError(f"dataset has {num_labels} image-level labels, expected {num_foreground}")

    def augment(position, example):
        key = tf.stack([tf.constant(seed, tf.int64), position])
        return _augment(example, key, crop_size=crop_size, flip=flip, scale_range=scale_range)

    ds = stream(ds, seed=seed, start=start_step * batch_size, shuffle_buffer=shuffle_buffer)
    return batched(ds.map(augment, num_parallel_calls=AUTOTUNE, deterministic=True), batch_size)


def _largest_over_processes(count: int) -> int:
    """max of ``count`` over all processes (a collective when there are several)."""
    if jax.process_count() == 1:
        return count
    return int(np.max(multihost_utils.process_allgather(np.int64(count))))


def _static_size(ds: tf.data.Dataset) -> tuple[int, int]:
    height, width = ds.element_spec["image"].shape[:2]
    if height is None or width is None:
        raise ValueError("images of this split vary in size: pass pad_to=(height, width)")
    return height, width


def eval_batches(ds: tf.data.Dataset, *, batch_size: int, pad_to: tuple[int, int] | None = None,
                 num_rows: int | None = None) -> Iterator[Batch]:
    """Finite eval batches covering every example of ``ds`` exactly once, in order.

    Every image is padded (bottom/right) to ``pad_to`` (default: the split's fixed image
    size), its mask with 255. Dummy rows with ``valid=False`` (mask 255, id b"") pad the shard
    to ``num_rows`` rows and then to a whole number of batches, so every process runs the
    same number of steps. ``num_rows`` defaults to the largest shard over all processes; with
    several processes that default all-gathers the shard sizes, so every process must call
    this together (pass ``num_rows=rows_per_process(...)`` to avoid the collective).
    """
    height, width = pad_to if pad_to is not None else _static_size(ds)
    static = ds.element_spec["image"].shape[:2]
    if any(n is not None and n > limit for n, limit in zip(static, (height, width))):
        raise ValueError(
            f"images are {static[0]}x{static[1]}, larger than pad_to={(height, width)}")
    count = _cardinality(ds)
    if num_rows is None:
        num_rows = _largest_over_processes(count)
    if num_rows < count:
        raise ValueError(f"num_rows={num_rows} is smaller than the shard ({count} examples)")
    total = math.ceil(num_rows / batch_size) * batch_size

    def pad(example):
        shape = tf.shape(example["image"])
        fits = tf.debugging.Assert(
            tf.reduce_all(shape[:2] <= [height, width]),
            [f"image larger than pad_to={(height, width)}: id", example["id"], "shape", shape])
        with tf.control_dependencies([fits]):  # both pads wait for the check: no pad error first
            raw = tf.identity(example["image"])
            mask = tf.cast(tf.identity(example["mask"])[:, :, 0], tf.int32)
        padded = {
            "image": pad_bottom_right(normalize(raw), height, width),
            "raw": pad_bottom_right(raw, height, width),
            "mask": pad_bottom_right(mask, height, width, IGNORE_LABEL),
        }
        for value in padded.values():
            value.set_shape((height, width) + value.shape[2:])
        return {**padded, "labels": example["labels"], "id": example["id"],
                "valid": tf.constant(True), "height": shape[0], "width": shape[1]}

    ds = ds.map(pad, num_parallel_calls=AUTOTUNE, deterministic=True)
    dummy = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}
    dummy["mask"] = tf.fill(ds.element_spec["mask"].shape, IGNORE_LABEL)
    padding = tf.data.Dataset.from_tensors(dummy).repeat(total - count)
    ds = ds.concatenate(padding).batch(batch_size, drop_remainder=True)
    return ds.prefetch(AUTOTUNE).as_numpy_iterator()
