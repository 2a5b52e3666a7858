"""Jitted, sharded multi-scale CAM inference (SEAM's, ``config.cam.method="multiscale"``).

The CAMs of the whole image are averaged over ``scales`` and horizontal flips, restricted to
the image-level label and to the unpadded area, and divided by their per-class maximum.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.training.sharded_apply import ReplicatedModel


def view_cam(model_cam: Callable, model, images: jax.Array, *, scale: float,
             mirrored: bool) -> jax.Array:
    """One view of SEAM's multi-scale inference: the ReLU'd CAM ``[B, H, W, C]`` of ``images``
    (``model_cam(model, images)``) resized by ``scale`` (and mirrored), mirrored back and
    resized to the input size."""
    b, h, w, _ = images.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    scaled = jax.image.resize(images, (b, *size, 3), "bilinear") if scale != 1 else images
    view = scaled[:, :, ::-1] if mirrored else scaled
    cam = jax.nn.relu(model_cam(model, view))
    if mirrored:
        cam = cam[:, :, ::-1]
    return jax.image.resize(cam, (b, h, w, cam.shape[-1]), "bilinear")


def normalise_cam(total: jax.Array, batch) -> jax.Array:
    """The summed views masked to the image-level label and to the unpadded area, divided by
    the per-class maximum."""
    _, h, w, _ = total.shape
    inside = ((jnp.arange(h)[None, :, None] < batch["height"][:, None, None])
              & (jnp.arange(w)[None, None, :] < batch["width"][:, None, None]))
    total = total * batch["labels"][:, None, None, :] * inside[..., None]
    return total / (jnp.max(total, axis=(1, 2), keepdims=True) + 1e-5)


class MultiScaleCAM:
    """``MultiScaleCAM(model, model_cam, scales=..., flip=...)(batch) -> [B, H, W, C]`` numpy
    normalised CAMs of this process's padded eval batch, at input resolution.

    Every scale (and its mirror image) is one jitted call that adds the view's CAM
    (:func:`view_cam`) into a sum kept on the devices (donated), in a fixed order; then
    :func:`normalise_cam`. One view's activations are alive at a time, so host/device memory
    is that of the largest view, not of all views of every scale together. The batch is
    sharded over ``"data"``; the model runs in eval mode, replicated.
    """

    def __init__(self, model: nnx.Module, model_cam: Callable, *, scales: Sequence[float],
                 flip: bool, batch_size_key: str = "batch_size"):
        self.model = ReplicatedModel(model)
        self.batch_size_key = batch_size_key
        data, replicated = self.model.data, self.model.replicated

        def add_view(state, images, total, *, scale, mirrored):
            return total + view_cam(model_cam, self.model.eval_model(state), images,
                                    scale=scale, mirrored=mirrored)

        self._views = [jax.jit(functools.partial(add_view, scale=float(scale), mirrored=mirrored),
                               in_shardings=(replicated, data, data), out_shardings=data,
                               donate_argnums=2)
                       for scale in scales for mirrored in ((False, True) if flip else (False,))]
        self._zeros = jax.jit(lambda shape: jnp.zeros(shape, jnp.float32), static_argnums=0,
                              out_shardings=data)
        self._finish = jax.jit(normalise_cam, out_shardings=data)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        keys = ("image", "labels", "height", "width")
        device_batch = self.model.shard({k: batch[k] for k in keys}, self.batch_size_key)
        b, h, w, _ = device_batch["image"].shape
        total = self._zeros((b, h, w, device_batch["labels"].shape[-1]))
        for add_view in self._views:
            total = add_view(self.model.state, device_batch["image"], total)
        return np.asarray(self.model.local_rows(self._finish(total, device_batch)))
