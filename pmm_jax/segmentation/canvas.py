"""An image of any size on the segmenter's fixed canvas, and its label map back (numpy only).

A compiled segmenter takes one input shape (PSPNet's pyramid pooling is built from the
static size), so new images go on a canvas of ``(H, W)`` pixels, the dataset's eval canvas:
an image that fits is padded at the bottom/right with zeros after normalisation (the mean
colour, as the eval pipeline pads); a larger one is first shrunk, aspect kept, to fit
(antialiased linear filter, rounded to uint8). The labels of the covered ``inner`` region
then go back to the image's own size by nearest neighbour.

``pmm_jax.predict`` and the exported model (``pmm_jax.export.load``) both use these
functions, so they see the same pixels; this module needs numpy alone (a server running an
exported model has no Flax or TensorFlow).
"""

from __future__ import annotations

import numpy as np

from pmm_jax.constants import IMAGENET_MEAN_UNIT, IMAGENET_STD_UNIT

# The ImageNet statistics of data/pipeline.py's ``normalize`` (RGB scaled to 0..1).
MEAN = np.asarray(IMAGENET_MEAN_UNIT, np.float32)
STD = np.asarray(IMAGENET_STD_UNIT, np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 ImageNet-normalised, the same float32 operations as the pipeline."""
    return (np.asarray(image, np.float32) / np.float32(255.0) - MEAN) / STD


def fitted_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """``size`` as is when it fits ``canvas``, else shrunk (aspect kept) to fit it."""
    height, width = size
    if height <= canvas[0] and width <= canvas[1]:
        return height, width
    scale = min(canvas[0] / height, canvas[1] / width)
    return (min(canvas[0], max(1, round(height * scale))),
            min(canvas[1], max(1, round(width * scale))))


def _filter_band(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, each ``[target, taps]``: output ``i`` of an antialiased linear
    (triangle) resize along one axis is ``sum_k weight[i, k] * input[index[i, k]]``. The
    triangle is stretched by the shrink factor, as PIL's BILINEAR reduce does; ``taps`` covers
    its support (about twice the factor), so the cost is linear in ``source``."""
    scale = source / target
    support = max(scale, 1.0)
    centres = (np.arange(target) + 0.5) * scale
    first = np.maximum(0, np.floor(centres - support - 0.5).astype(np.int64))
    taps = int(np.ceil(2 * support)) + 2
    index = first[:, None] + np.arange(taps)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs(index + 0.5 - centres[:, None]) / support)
    weights[index >= source] = 0.0
    index = np.minimum(index, source - 1)
    return index, weights / weights.sum(axis=1, keepdims=True)


def _shrink_axis(values: np.ndarray, target: int, axis: int) -> np.ndarray:
    """``values`` (``[h, w, c]``, any dtype) resized to ``target`` along ``axis`` (0 or 1),
    float64; memory holds the output and one gathered slice of it at a time."""
    index, weights = _filter_band(values.shape[axis], target)
    shape = [1, 1, 1]
    shape[axis] = target
    size = [target if a == axis else n for a, n in enumerate(values.shape)]
    out, term = np.zeros(size, np.float64), np.empty(size, np.float64)
    for k in range(index.shape[1]):
        np.multiply(weights[:, k].reshape(shape), np.take(values, index[:, k], axis=axis),
                    out=term)
        out += term
    return out


def shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[h, w, 3]`` resized to ``size`` (separable antialiased linear filter, one axis
    at a time: time linear in the image, memory a few outputs of the first axis)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    out = _shrink_axis(_shrink_axis(image, size[0], 0), size[1], 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Checks an image array: uint8 ``[H, W, 3]`` (greyscale ``[H, W]`` is repeated)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} "
                         f"{list(image.shape)}")
    return image


def fit(image: np.ndarray, canvas: tuple[int, int]
        ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(normalised [H, W, 3] float32, raw [H, W, 3] uint8, inner (h, w))`` of ``image`` on
    ``canvas``: shrunk to fit when larger, padded at the bottom/right (0 after normalisation,
    black in ``raw``); ``inner`` is the region the image covers."""
    image = as_rgb(image)
    inner = fitted_size(image.shape[:2], canvas)
    fitted = shrink(image, inner)
    raw = np.zeros((*canvas, 3), np.uint8)
    raw[:inner[0], :inner[1]] = fitted
    normalised = np.zeros((*canvas, 3), np.float32)
    normalised[:inner[0], :inner[1]] = normalize(fitted)
    return normalised, raw, inner


def restore(labels: np.ndarray, inner: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The canvas label map's ``inner`` region at ``size`` (nearest neighbour), uint8."""
    region = np.asarray(labels)[:inner[0], :inner[1]]
    if tuple(inner) == tuple(size):
        return region.astype(np.uint8)
    rows = np.minimum((np.arange(size[0]) + 0.5) * inner[0] / size[0], inner[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[1]) + 0.5) * inner[1] / size[1], inner[1] - 1).astype(int)
    return region[rows[:, None], cols[None, :]].astype(np.uint8)
