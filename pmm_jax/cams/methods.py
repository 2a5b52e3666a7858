"""The CAM inference methods: ``config.cam.method`` names one entry of :data:`CAM_METHODS`.

An entry is a factory ``make(cam_config, model, model_cam) -> predict``: ``cam_config`` is
``config.cam``, ``model`` the trained classifier, ``model_cam(model, images) -> [B,h,w,C]``
the CAM its classifier method reads (``classifier.ClassifierMethod.cam``), and
``predict(eval_batch, rows) -> [B, H, W, C]`` numpy CAMs of this process's padded eval batch
at input resolution, restricted to the image-level label, normalised per class by their
maximum (only ``rows`` need be correct). Built in: "multiscale" (SEAM's inference over
``cam.scales`` and flips, ``multiscale_inference``) and "multicrop" (PMM's multi-crop
inference, ``multicrop_inference``: ``cam.multicrop.scales``, ``crop``, ``stride``,
``tile_batch``). A new method is one ``CAM_METHODS.register(name, make)``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from pmm_jax.registry import Registry

Predict = Callable[[Mapping[str, np.ndarray], Sequence[int]], np.ndarray]

CAM_METHODS: Registry[Callable[..., Predict]] = Registry("CAM method")


def method_name(config) -> str:
    """``config.cam.method`` (default "multiscale")."""
    return config.cam.get("method", "multiscale")


def make_predictor(config, model, model_cam: Callable) -> Predict:
    """The predictor of the configured method (``UnknownNameError`` listing the registered
    ones for another name)."""
    return CAM_METHODS.get(method_name(config))(config.cam, model, model_cam)


@CAM_METHODS.register("multiscale")
def multiscale(cam_config, model, model_cam: Callable) -> Predict:
    from pmm_jax.cams.multiscale_inference import MultiScaleCAM

    predict = MultiScaleCAM(model, model_cam, scales=tuple(cam_config.scales),
                            flip=cam_config.flip, batch_size_key="config.cam.batch_size")
    return lambda batch, rows: predict(batch)


@CAM_METHODS.register("multicrop")
def multicrop(cam_config, model, model_cam: Callable) -> Predict:
    from pmm_jax.cams.multicrop_inference import MultiCropCAM

    mc = cam_config.multicrop
    return MultiCropCAM(model, model_cam, scales=tuple(mc.scales), crop=mc.crop,
                        stride=mc.stride, flip=cam_config.flip, tile_batch=mc.tile_batch,
                        batch_size_key="config.cam.batch_size",
                        tile_batch_key="config.cam.multicrop.tile_batch")
