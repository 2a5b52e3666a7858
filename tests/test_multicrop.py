"""pmm_jax.multicrop against a direct transcription of the official tiling loops (written here
from the reference semantics), on many image sizes and scales."""

import math

import numpy as np
import pytest

from pmm_jax import multicrop


def reference_boxes(width, height, s, crop=448, stride=300):
    """The official double loop, transcribed: x-major, last tile flush with the border."""
    out = []
    w, h = int(width * s), int(height * s)
    w_num = 1 + int(math.ceil(max(0.0, float(w - crop)) / stride))
    h_num = 1 + int(math.ceil(max(0.0, float(h - crop)) / stride))
    for wi in range(w_num):
        for hi in range(h_num):
            if wi == w_num - 1:
                x2 = w
                x1 = max(0, x2 - crop)
            else:
                x2 = min(w, (wi + 1) * stride)
                x1 = wi * stride
            if hi == h_num - 1:
                y2 = h
                y1 = max(0, y2 - crop)
            else:
                y2 = min(h, (hi + 1) * stride)
                y1 = hi * stride
            out.append((int(float(x1) / s), int(float(y1) / s), int(float(x2) / s),
                        int(float(y2) / s)))
    return out


def reference_label(heat, param, num_classes, thresh=0.1):
    selected = np.zeros_like(next(iter(heat.values())))
    selected[int(param[1]):int(param[3]), int(param[0]):int(param[2])] = 1
    new = np.zeros(num_classes, np.float32)
    for i in range(num_classes):
        if i + 1 not in heat:
            continue
        mask = heat[i + 1]
        if (mask > 0.9).sum() == 0:
            continue
        inter = float(((mask > 0.9) * selected).sum())
        if inter / (mask > 0.9).sum() > thresh or inter / selected.sum() > thresh:
            new[i] = 1
    return new


def test_scales_are_the_papers():
    assert multicrop.SCALES == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)


@pytest.mark.parametrize("size", [(500, 375), (333, 500), (100, 80), (448, 448), (449, 301)])
def test_tile_boxes_match_the_official_loops(size):
    for s in multicrop.SCALES:
        assert multicrop.tile_boxes(*size, s) == reference_boxes(*size, s)
    assert multicrop.tile_boxes(100, 80, 0.75) == [(0, 0, 100, 80)]  # small: one tile


def test_crop_labels_match_the_official_rule():
    rng = np.random.default_rng(0)
    h, w, c = 60, 80, 6
    heat = {k + 1: rng.random((h, w)) ** 3 for k in (0, 2, 5)}
    heat[3] = np.zeros((h, w))  # a class whose mask never passes 0.9
    masks = {k - 1: v for k, v in heat.items()}
    for _ in range(50):
        x1, y1 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        box = (x1, y1, int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1)))
        np.testing.assert_array_equal(multicrop.crop_labels(masks, box, c),
                                      reference_label(heat, box, c))


def test_sample_training_crop_prefers_a_labelled_tile():
    masks = {1: np.zeros((900, 1200))}
    masks[1][800:, 1100:] = 1.0  # only the bottom-right corner has the object
    box, labels = multicrop.sample_training_crop(masks, 1200, 900, 3,
                                                 np.random.default_rng(0), scales=(1.0,))
    assert labels.tolist() == [0.0, 1.0, 0.0]
    assert box[2] == 1200 and box[3] == 900
    box, labels = multicrop.sample_training_crop({}, 1200, 900, 3, np.random.default_rng(0))
    assert labels.sum() == 0  # no rough mask: the last tile tried, all-zero label


def test_accumulate_averages_over_covering_tiles_and_masks_labels():
    boxes = [(0, 0, 6, 4), (3, 0, 8, 4)]
    cams = [np.ones((2, 4, 6)), 3 * np.ones((2, 4, 5))]
    out = multicrop.accumulate(cams, boxes, np.array([1.0, 0.0]), 5, 8)
    assert out.shape == (2, 5, 8)
    np.testing.assert_allclose(out[0, 0], [1, 1, 1, 2, 2, 2, 3, 3])
    assert np.all(out[0, 4] == 0) and np.all(out[1] == 0)
