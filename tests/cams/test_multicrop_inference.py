"""pmm_jax.cams.multicrop_inference (jitted, sharded multi-crop CAM inference) against a plain per-tile
loop written from the official ``infer_multi_crop``: each tile cut and resized in numpy with
PIL's bilinear filter, the model called on it and on its mirror image, the CAMs resized back to
their boxes with torch's ``align_corners=False`` bilinear and merged by
``multicrop_tiling.accumulate``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax.cams import classifier, multicrop_inference, multicrop_tiling, seam
from pmm_jax.constants import IMAGENET_MEAN_UNIT as IMAGENET_MEAN
from pmm_jax.constants import IMAGENET_STD_UNIT as IMAGENET_STD
from pmm_jax.models.scalenet import ScaleNet

# The CAM a SEAM classifier gives inference (its PCM-refined CAM).
model_cam = classifier.CLASSIFIERS.get("seam").cam
from tests.support.nnx_values import materialize

CROP, STRIDE, SCALES = 32, 20, (0.75, 1.0, 1.6)


def test_interp_matrix_is_jax_resize_of_the_interval():
    x = np.random.default_rng(0).random((48, 2)).astype(np.float32)
    interp = jax.jit(multicrop_inference.interp_matrix, static_argnums=(0, 3),
                     static_argnames="antialias")
    for (start, stop), size, antialias in [((3, 17), 32, True), ((0, 40), 32, True),
                                           ((0, 40), 32, False), ((5, 30), 11, True)]:
        expected = jax.image.resize(x[start:stop], (size, 2), "bilinear", antialias=antialias)
        # Placed into [4, 4 + size) of a 50-row canvas: zero rows elsewhere.
        placed = interp(50, 4, size, 48, start, stop - start, antialias=antialias)
        np.testing.assert_allclose(placed[4:4 + size] @ x, expected, rtol=1e-5, atol=1e-6)
        assert not np.any(placed[:4]) and not np.any(placed[4 + size:])


def resize_matrix(n_in, n_out, antialias):
    """PIL's BILINEAR weights (``antialias``: the triangle widened by the shrink factor), which
    for enlarging are torch's ``align_corners=False`` bilinear (borders clamped)."""
    scale = n_in / n_out
    support = max(scale, 1.0) if antialias else 1.0
    centre = (np.arange(n_out) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] + 0.5 - centre[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize(x, height, width, antialias):
    """``x[H, W, C]`` to ``[height, width, C]`` with :func:`resize_matrix` weights."""
    rows = resize_matrix(x.shape[0], height, antialias)
    cols = resize_matrix(x.shape[1], width, antialias)
    return np.einsum("oh,hwc,pw->opc", rows, x, cols)


def one_view_cam(model):
    """``forward(view[H, W, 3]) -> [h, w, C]``: the model's CAM of one view, jitted once."""
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, x: model_cam(nnx.merge(graphdef, state), x))
    return lambda view: np.asarray(jitted(state, jnp.asarray(view[None], jnp.float32)))[0]


def reference_cam(forward, raw, labels, flip=True):
    """The per-tile loop (official infer_multi_crop order), then per-class max normalisation."""
    h, w = raw.shape[:2]
    image = raw.astype(np.float64) / 255.0
    cams, boxes = [], []
    for scale in SCALES:
        for box in multicrop_tiling.tile_boxes(w, h, scale, CROP, STRIDE):
            x1, y1, x2, y2 = box
            tile = resize(image[y1:y2, x1:x2], CROP, CROP, antialias=True)
            tile = ((tile - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD))
            for mirrored in ((False, True) if flip else (False,)):
                view = tile[:, ::-1] if mirrored else tile
                cam = np.maximum(forward(view), 0)
                cam = cam[:, ::-1] if mirrored else cam
                cams.append(resize(cam, y2 - y1, x2 - x1, antialias=False).transpose(2, 0, 1))
                boxes.append(box)
    full = multicrop_tiling.accumulate(cams, boxes, labels, h, w)
    return full / (full.max(axis=(1, 2), keepdims=True) + 1e-5)


# A ScaleNet-layout backbone (PMM's multi-crop classifier), one block per layer, 1/16 width.
TINY_SCALENET = dict(structure=[[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14],
                                [10, 6, 2, 1, 7]], layers=(1, 1, 1, 1), width_div=16)


@pytest.fixture(scope="module")
def tiny_seam():
    """A tiny ScaleNet SEAM classifier over 3 classes, in eval mode."""
    model = materialize(nnx.eval_shape(lambda: seam.SEAM(
        ScaleNet(**TINY_SCALENET, rngs=nnx.Rngs(0)), 3, dropout=0.0, pcm_widths=(4, 8),
        rngs=nnx.Rngs(1))))
    model.eval()
    return model


def test_jitted_multicrop_matches_the_per_tile_loop(tiny_seam):
    rng = np.random.default_rng(0)
    sizes = [(45, 37), (30, 50), (48, 52), (20, 24)]  # (h, w), padded to 48 x 52
    labels = np.array([[1, 0, 1], [1, 1, 0], [1, 1, 1], [0, 0, 1]], np.float32)
    raw = np.zeros((4, 48, 52, 3), np.uint8)
    for i, (h, w) in enumerate(sizes):
        raw[i, :h, :w] = rng.integers(0, 256, (h, w, 3))
    batch = {"raw": raw, "labels": labels, "valid": np.array([True, True, True, False]),
             "height": np.array([h for h, _ in sizes]), "width": np.array([w for _, w in sizes])}
    # 8 tiles per step over the 4 devices (2 each): several steps, padded ones included.
    runner = multicrop_inference.MultiCropCAM(tiny_seam, model_cam, scales=SCALES, crop=CROP,
                                        stride=STRIDE, flip=True, tile_batch=8)
    out = runner(batch, rows=[0, 2, 1])
    assert out.shape == (4, 48, 52, 3)
    forward = one_view_cam(tiny_seam)
    for i in (0, 1, 2):
        h, w = sizes[i]
        expected = reference_cam(forward, raw[i, :h, :w], labels[i])
        assert expected.max() > 0.9  # a present class with a non-zero CAM
        np.testing.assert_allclose(out[i, :h, :w].transpose(2, 0, 1), expected, atol=1e-5)
        assert not np.any(out[i, h:]) and not np.any(out[i, :, w:])
        assert np.all(out[i, :h, :w, labels[i] == 0] == 0)
    assert not np.any(out[3])  # a row without tiles stays empty


def test_tile_batch_must_split_over_the_devices(tiny_seam):
    with pytest.raises(ValueError, match="config.cam.multicrop.tile_batch=6 must be a multiple"):
        multicrop_inference.MultiCropCAM(tiny_seam, model_cam, scales=SCALES, crop=CROP, stride=STRIDE,
                                   flip=True, tile_batch=6,
                                   tile_batch_key="config.cam.multicrop.tile_batch")
