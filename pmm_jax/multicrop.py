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
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

SCALES = tuple(0.75 + 0.25 * i for i in range(10))  # 0.75, 1.0, ..., 3.0
CROP = 448
STRIDE = 300
LABEL_THRESHOLD = 0.1
ROUGH_MASK_THRESHOLD = 0.9


def axis_spans(length: int, crop: int = CROP, stride: int = STRIDE) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the tiles along one axis of a scaled image of ``length`` pixels."""
    n = 1 + math.ceil(max(0, length - crop) / stride)
    spans = [(i * stride, min(length, (i + 1) * stride)) for i in range(n - 1)]
    return spans + [(max(0, length - crop), length)]


def tile_boxes(width: int, height: int, scale: float, crop: int = CROP, stride: int = STRIDE
               ) -> list[tuple[int, int, int, int]]:
    """Tile boxes ``(x1, y1, x2, y2)`` in original-image pixels at one scale, x-major."""
    xs = axis_spans(int(width * scale), crop, stride)
    ys = axis_spans(int(height * scale), crop, stride)
    back = lambda v: int(float(v) / scale)
    return [(back(x1), back(y1), back(x2), back(y2)) for x1, x2 in xs for y1, y2 in ys]


def crop_labels(rough_masks: Mapping[int, np.ndarray], box: tuple[int, int, int, int],
                num_classes: int, threshold: float = LABEL_THRESHOLD) -> np.ndarray:
    """The 10% rule: float32 ``[num_classes]`` multi-hot label of a tile.

    ``rough_masks``: ``{0-based class: [H, W] probability}`` (the official files key classes
    1-based; convert before calling). Classes without a mask or with no pixel above 0.9 are 0.
    """
    x1, y1, x2, y2 = box
    labels = np.zeros(num_classes, np.float32)
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
                         num_classes: int, rng: np.random.Generator,
                         scales: Sequence[float] = SCALES, crop: int = CROP,
                         stride: int = STRIDE) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A random scale, then up to (number of tiles) random tiles until one has a positive
    label; returns ``(box, labels)`` of that tile, or of the last one tried (all-zero)."""
    boxes = tile_boxes(width, height, scales[int(rng.random() * len(scales))], crop, stride)
    for _ in range(len(boxes)):
        box = boxes[int(rng.random() * len(boxes))]
        labels = crop_labels(rough_masks, box, num_classes)
        if labels.sum() > 0:
            break
    return box, labels


def accumulate(tile_cams: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]],
               labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Full-image ``[C, H, W]`` CAM: the mean over the tiles covering each pixel.

    ``tile_cams[i]``: ``[C, y2-y1, x2-x1]``, tile i's CAM already resized to its box (and
    un-flipped); ``labels``: ``[C]`` image-level label the CAMs are multiplied by. Pixels no
    tile covers keep 0.
    """
    total = np.zeros((len(labels), height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for cam, (x1, y1, x2, y2) in zip(tile_cams, boxes):
        total[:, y1:y2, x1:x2] += cam * labels[:, None, None]
        count[y1:y2, x1:x2] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)
