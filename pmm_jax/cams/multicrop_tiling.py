"""PMM's multi-crop tiling (numpy, host side): tile boxes over scales, the training label rule
driven by rough masks, and test-time accumulation of tile CAMs.

Semantics of the official ``VOC12ClsDatasetMultiCrop`` / ``VOC12ClsHeatCropDataset`` and
``infer_multi_crop.py`` (see ../shared/pmm-reference.md):

* At scale s the image is ``int(W*s) x int(H*s)``; along an axis of length L there are
  ``n = 1 + ceil(max(0, L - crop) / stride)`` tiles; tile i < n-1 spans
  ``[i*stride, min(L, (i+1)*stride))`` and the last one ``[max(0, L-crop), L)``. Coordinates
  map back to the original image by ``int(x / s)``. Tiles are listed x-major (for each
  column, every row), each is cut from the original image and resized to crop x crop.
* Training: class c stays positive for a tile if its rough mask m_c (probability > 0.9)
  satisfies ``|m_c in tile| / |m_c| > 0.1`` or ``|m_c in tile| / |tile| > 0.1``.
* Test: each tile's CAM, resized back to its box and multiplied by the image-level label, is
  summed into the full map and divided by the per-pixel tile count (flipped views count as
  tiles of their own).

Rough masks (training): one file per training image in a folder, in either of the official
``VOC12ClsHeatCropDataset`` formats: ``<id>.png``, a label PNG whose value c+1 marks class c's
rough mask (0 background, anything else, e.g. 255, nothing), or ``<id>.npy``, a pickled dict
``{0: background probability, c+1: probability of class c}`` (classes keyed 1-based, key 0
ignored) thresholded at 0.9. ``python -m pmm_jax.pseudo_masks --method=rough`` writes the PNG form from a first
run's CAMs.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from pmm_jax.constants import ROUGH_MASK_THRESHOLD

SCALES = tuple(0.75 + 0.25 * i for i in range(10))  # 0.75, 1.0, ..., 3.0
CROP = 448
STRIDE = 300
LABEL_THRESHOLD = 0.1


def axis_spans(length: int, crop: int = CROP, stride: int = STRIDE) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the tiles along one axis of a scaled image of ``length`` pixels."""
    n = 1 + math.ceil(max(0, length - crop) / stride)
    spans = [(i * stride, min(length, (i + 1) * stride)) for i in range(n - 1)]
    return spans + [(max(0, length - crop), length)]


def tile_boxes(width: int, height: int, scale: float, crop: int = CROP, stride: int = STRIDE
               ) -> list[tuple[int, int, int, int]]:
    """The tiles of an image at one scale, x-major.

    Args:
        width: the image's width (original pixels).
        height: the image's height.
        scale: the image is tiled at ``(width, height) * scale``.
        crop: tile size in scaled pixels.
        stride: tile step in scaled pixels.

    Returns:
        Tile boxes ``(x1, y1, x2, y2)`` in original-image pixels.
    """
    xs = axis_spans(int(width * scale), crop, stride)
    ys = axis_spans(int(height * scale), crop, stride)
    back = lambda v: int(float(v) / scale)
    return [(back(x1), back(y1), back(x2), back(y2)) for x1, x2 in xs for y1, y2 in ys]


def crop_labels(rough_masks: Mapping[int, np.ndarray], box: tuple[int, int, int, int],
                num_foreground: int, threshold: float = LABEL_THRESHOLD) -> np.ndarray:
    """The 10% rule: the multi-hot label of a tile.

    Args:
        rough_masks: ``{0-based class: [H, W] probability}`` (the official files key classes
            1-based; convert before calling).
        box: the tile ``(x1, y1, x2, y2)`` in image pixels.
        num_foreground: the label's length.
        threshold: the share of a class's mask (or of the tile) that makes it present.

    Returns:
        float32 ``[num_foreground]``; classes without a mask or with no pixel above
        ``ROUGH_MASK_THRESHOLD`` are 0.
    """
    x1, y1, x2, y2 = box
    labels = np.zeros(num_foreground, np.float32)
    for c, prob in rough_masks.items():
        mask = prob > ROUGH_MASK_THRESHOLD
        total = mask.sum()
        if total == 0:
            continue
        inside = float(mask[y1:y2, x1:x2].sum())
        area = float(max(0, min(y2, mask.shape[0]) - y1) * max(0, min(x2, mask.shape[1]) - x1))
        if inside / total > threshold or (area > 0 and inside / area > threshold):
            labels[c] = 1.0
    return labels


def sample_training_crop(rough_masks: Mapping[int, np.ndarray], width: int, height: int,
                         num_foreground: int, rng: np.random.Generator,
                         scales: Sequence[float] = SCALES, crop: int = CROP,
                         stride: int = STRIDE) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A training tile: a random scale, then up to (number of tiles) random tiles until one
    has a positive label.

    Args:
        rough_masks: as :func:`crop_labels`.
        width: the image's width.
        height: the image's height.
        num_foreground: the label's length.
        rng: the only source of randomness.
        scales: the scales to draw from.
        crop: tile size in scaled pixels.
        stride: tile step in scaled pixels.

    Returns:
        ``(box, labels)`` of that tile, or of the last one tried (labels all zero).
    """
    boxes = tile_boxes(width, height, scales[int(rng.random() * len(scales))], crop, stride)
    for _ in range(len(boxes)):
        box = boxes[int(rng.random() * len(boxes))]
        labels = crop_labels(rough_masks, box, num_foreground)
        if labels.sum() > 0:
            break
    return box, labels


def accumulate(tile_cams: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]],
               labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The full-image CAM: the mean over the tiles covering each pixel.

    Args:
        tile_cams: ``[C, y2-y1, x2-x1]`` per tile, its CAM already resized to its box (and
            un-flipped).
        boxes: each tile's ``(x1, y1, x2, y2)``.
        labels: ``[C]`` image-level label the CAMs are multiplied by.
        height: the image's height.
        width: the image's width.

    Returns:
        float32 ``[C, H, W]``; pixels no tile covers are 0.
    """
    total = np.zeros((len(labels), height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for cam, (x1, y1, x2, y2) in zip(tile_cams, boxes):
        total[:, y1:y2, x1:x2] += cam * labels[:, None, None]
        count[y1:y2, x1:x2] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


ROUGH_MASK_SUFFIXES = (".png", ".npy")
_MAX_LISTED_MISSING = 5


def rough_mask_paths(directory: str, ids: Iterable[str]) -> dict[str, str]:
    """``{id: rough-mask file}`` (``<id>.png``, else ``<id>.npy``) for every id; raises
    FileNotFoundError with the number of missing files and the first expected names."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"rough-mask folder {directory} does not exist (make it with "
                                "`python -m pmm_jax.pseudo_masks --method=rough`, see docs/multicrop.md)")
    present = set(os.listdir(directory))
    paths, missing = {}, []
    for image_id in ids:
        name = next((image_id + s for s in ROUGH_MASK_SUFFIXES if image_id + s in present), None)
        if name is None:
            missing.append(os.path.join(directory, image_id + ".png"))
        else:
            paths[image_id] = os.path.join(directory, name)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths) + len(missing)} training images have no rough mask "
            f"in {directory} (first: {', '.join(missing[:_MAX_LISTED_MISSING])}; .npy is "
            "accepted too). Make them with `python -m pmm_jax.pseudo_masks --method=rough` (docs/multicrop.md).")
    return paths


def read_rough_masks(path: str, num_foreground: int) -> dict[int, np.ndarray]:
    """``{0-based class: [H, W] bool}`` rough masks from a file of either format (module
    docstring); classes without a pixel are left out. Errors name the file."""
    if path.endswith(".png"):
        from pmm_jax.files.safe_io import read_mask

        labels = read_mask(path)
        values = np.unique(labels)
        bad = values[(values > num_foreground) & (values != 255)]
        if bad.size:
            raise ValueError(f"{path}: rough-mask values {bad.tolist()} are not classes 1.."
                             f"{num_foreground} (class c+1), 0 or 255")
        return {int(v) - 1: labels == v for v in values if 1 <= v <= num_foreground}
    from pmm_jax.files.safe_io import read_class_dict

    masks = {}
    for key, prob in read_class_dict(path).items():  # refuses non-dicts and non-int keys
        if not 0 <= key <= num_foreground:
            raise ValueError(f"{path}: class key {key} is outside 0..{num_foreground} (the keys "
                             "are 1-based: c+1 for class c, 0 for background)")
        if key > 0:
            masks[key - 1] = np.asarray(prob) > ROUGH_MASK_THRESHOLD
    return masks
