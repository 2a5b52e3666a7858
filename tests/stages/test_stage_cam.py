"""The multi-scale CAM inference: streamed one view per jitted call, it gives the CAMs of the
single function over all views it replaced."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.cams import classifier, seam
from pmm_jax.cams.multiscale_inference import MultiScaleCAM
from pmm_jax.models.resnet38 import ResNet38
from pmm_jax.stages import cam
from pmm_jax.training import trainer
from tests.support.nnx_values import materialize

SCALES = (0.5, 1.0, 1.5)
SEAM_CAM = classifier.CLASSIFIERS.get("seam").cam


def previous_multi_scale_cam(model, batch, *, scales, flip):
    """The former single-function multi-scale CAM: every view in one jitted function."""
    images = batch["image"]
    b, h, w, _ = images.shape
    total = 0.0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = jax.image.resize(images, (b, *size, 3), "bilinear") if scale != 1 else images
        for mirrored in ((False, True) if flip else (False,)):
            view = scaled[:, :, ::-1] if mirrored else scaled
            c = jax.nn.relu(SEAM_CAM(model, view))
            if mirrored:
                c = c[:, :, ::-1]
            total = total + jax.image.resize(c, (b, h, w, c.shape[-1]), "bilinear")
    inside = ((jnp.arange(h)[None, :, None] < batch["height"][:, None, None])
              & (jnp.arange(w)[None, None, :] < batch["width"][:, None, None]))
    total = total * batch["labels"][:, None, None, :] * inside[..., None]
    return total / (jnp.max(total, axis=(1, 2), keepdims=True) + 1e-5)


def test_streamed_multi_scale_cams_equal_the_single_function(monkeypatch):
    # A 1/32-width ResNet38-d SEAM: at 1.5 x 48 px its CAM has 81 positions; PCM_BLOCK is
    # lowered so the PCM's column blocks are exercised too.
    model = materialize(nnx.eval_shape(lambda: seam.SEAM(
        ResNet38(width_div=32, blocks=(1, 1, 1, 1), rngs=nnx.Rngs(0)), 3, pcm_widths=(4, 8),
        rngs=nnx.Rngs(1))))
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (30, 44), (41, 48), (20, 24)]  # (h, w), padded to 48 x 48
    image = np.zeros((4, 48, 48, 3), np.float32)
    for i, (h, w) in enumerate(sizes):
        image[i, :h, :w] = rng.standard_normal((h, w, 3))
    batch = {"image": image, "labels": np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]],
                                                np.float32),
             "height": np.array([h for h, _ in sizes], np.int32),
             "width": np.array([w for _, w in sizes], np.int32), "id": np.array([b"a"] * 4)}
    previous = trainer.make_predict_fn(model, functools.partial(
        previous_multi_scale_cam, scales=SCALES, flip=True))(batch)
    monkeypatch.setattr(seam, "PCM_BLOCK", 32)
    streamed = MultiScaleCAM(model, SEAM_CAM, scales=SCALES, flip=True)(batch)
    assert streamed.shape == (4, 48, 48, 3) and streamed.dtype == np.float32
    assert np.max(streamed) > 0.9
    np.testing.assert_allclose(streamed, previous, rtol=1e-5, atol=1e-6)


def test_without_val_the_cam_miou_is_not_available(tmp_path):
    """A folder dataset without masks has no val: no CAM mIoU (None, "n/a"), not 0."""
    import types

    from pmm_jax.files.workdir import Workdir

    data = types.SimpleNamespace(has_split=lambda split: split == "train")
    metrics = cam.cam_metrics(Workdir(str(tmp_path)), data)
    assert metrics["cam_miou"] is None and metrics["cam_miou_curve"] == {}
