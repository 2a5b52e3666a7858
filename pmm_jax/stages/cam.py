"""Stage ``cam``: class activation maps for the train and val splits.

``config.cam.method`` (default "multiscale"): "multiscale" averages the CAMs of the whole
image over ``config.cam.scales`` and horizontal flips (SEAM's inference; one jitted call per
view, :class:`MultiScaleCAM`); "multicrop" is
PMM's multi-crop inference (``pmm_jax.cams.multicrop_inference``: ``multicrop.tile_boxes`` tiles of
``config.cam.multicrop.crop`` and ``stride`` at every one of ``multicrop.scales``, ``flip``ped
too, ``tile_batch`` tiles per jitted step). Either way the CAMs are restricted to the
image-level label (as WSSS does for train and for CAM evaluation on val), normalised per class
by their maximum, and written one file per image in the official PMM/SEAM format
(``WORKDIR/cams/<split>/<id>.npy``). The stage reports CAM mIoU on val at the fixed
background threshold ``scoring.DEFAULT_CAM_BG_THRESHOLD`` and the threshold curve.
A SEAM classifier (``config.cls.method = "seam"``) contributes its PCM-refined CAM.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from pmm_jax import drawing
from pmm_jax.cams import multicrop_inference
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import common
from pmm_jax.stages.cls import build_model
from pmm_jax import scoring
from pmm_jax.training import checkpoints, distributed
from pmm_jax.training import sharding as shd

if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset

CURVE_THRESHOLDS = tuple(round(0.05 + 0.05 * i, 2) for i in range(10))
METHODS = ("multiscale", "multicrop")


def model_cam(model, images: jax.Array) -> jax.Array:
    """The CAM inference uses: a SEAM model's refined foreground channels (``cam_rv`` without
    its background channel), else the raw CAM."""
    out = model(images)
    return out["cam_rv"][..., 1:] if "cam_rv" in out else out["cam"]


def view_cam(model, images: jax.Array, *, scale: float, mirrored: bool) -> jax.Array:
    """One view of SEAM's multi-scale inference: the ReLU'd CAM ``[B, H, W, C]`` of ``images``
    resized by ``scale`` (and mirrored), mirrored back and resized to the input size."""
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
    """``MultiScaleCAM(model, scales=..., flip=...)(batch) -> [B, H, W, C]`` numpy normalised
    CAMs of this process's padded eval batch, at input resolution (SEAM's inference).

    Every scale (and its mirror image) is one jitted call that adds the view's CAM
    (:func:`view_cam`) into a sum kept on the devices (donated), in a fixed order; then
    :func:`normalise_cam`. One view's activations are alive at a time, so host/device memory
    is that of the largest view, not of all views of every scale together (one jitted function
    for all views needed ~6 GiB per 500 px image on a CPU; docs/design.md). The batch is
    sharded over ``"data"``; the model runs in eval mode, replicated.
    """

    def __init__(self, model: nnx.Module, *, scales: Sequence[float], flip: bool,
                 batch_size_key: str = "batch_size"):
        self.mesh = shd.make_mesh()
        self.batch_size_key = batch_size_key
        graphdef, state = nnx.split(model)
        self.state = shd.replicate(state, self.mesh)
        data, replicated = shd.data_sharding(self.mesh), shd.replicated(self.mesh)

        def add_view(state, images, total, *, scale, mirrored):
            eval_model = nnx.merge(graphdef, state)
            eval_model.eval()
            return total + view_cam(eval_model, images, scale=scale, mirrored=mirrored)

        self._views = [jax.jit(functools.partial(add_view, scale=float(scale), mirrored=mirrored),
                               in_shardings=(replicated, data, data), out_shardings=data,
                               donate_argnums=2)
                       for scale in scales for mirrored in ((False, True) if flip else (False,))]
        self._zeros = jax.jit(lambda shape: jnp.zeros(shape, jnp.float32), static_argnums=0,
                              out_shardings=data)
        self._finish = jax.jit(normalise_cam, out_shardings=data)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        keys = ("image", "labels", "height", "width")
        device_batch = shd.shard_batch({k: batch[k] for k in keys}, self.mesh,
                                       config_key=self.batch_size_key)
        b, h, w, _ = device_batch["image"].shape
        total = self._zeros((b, h, w, device_batch["labels"].shape[-1]))
        for add_view in self._views:
            total = add_view(self.state, device_batch["image"], total)
        out = self._finish(total, device_batch)
        local = multihost_utils.global_array_to_host_local_array(
            out, self.mesh, PartitionSpec(shd.DATA_AXIS))
        return np.asarray(jax.device_get(local))


def method(config) -> str:
    """``config.cam.method``: "multiscale" (default) or "multicrop"; ValueError otherwise."""
    name = config.cam.get("method", "multiscale")
    if name not in METHODS:
        raise ValueError(f"config.cam.method must be one of {METHODS}, got {name!r}")
    return name


def make_predictor(config, model) -> Callable[[Mapping[str, np.ndarray], Sequence[int]],
                                              np.ndarray]:
    """``predict(eval_batch, rows) -> [B, H, W, C]`` normalised CAMs of the configured method
    (only ``rows`` need be correct; the multi-crop path skips the other rows' tiles)."""
    if method(config) == "multicrop":
        mc = config.cam.multicrop
        return multicrop_inference.MultiCropCAM(
            model, model_cam, scales=tuple(mc.scales), crop=mc.crop, stride=mc.stride,
            flip=config.cam.flip, tile_batch=mc.tile_batch, batch_size_key="config.cam.batch_size",
            tile_batch_key="config.cam.multicrop.tile_batch")
    predict = MultiScaleCAM(model, scales=tuple(config.cam.scales), flip=config.cam.flip,
                            batch_size_key="config.cam.batch_size")
    return lambda batch, rows: predict(batch)


def cam_path(wd: Workdir, split: str, image_id: str) -> str:
    return os.path.join(wd.cams(split), f"{image_id}.npy")


def write_split(config, wd: Workdir, data: Dataset, model, split: str, predict=None) -> int:
    """Writes the CAM file of every image of this process's shard of ``split``; returns how many.

    ``predict``: a :func:`make_predictor` result to reuse (one compilation for both splits);
    made from ``model`` when None."""
    predict = predict or make_predictor(config, model)
    key = "config.cam.batch_size"
    batches = data.eval_batches(split, config.cam.batch_size, key)
    total = data.num_eval_batches(split, config.cam.batch_size, key)
    safe_io.remove_stale_temps(wd.cams(split))
    written = 0
    for batch in tqdm.tqdm(batches, desc=f"cam {split}", unit="batch", total=total,
                           disable=not distributed.is_main()):
        rows = [i for i in np.flatnonzero(batch["valid"])
                if not os.path.exists(cam_path(wd, split, batch["id"][i].decode()))]
        # The prediction is one computation over every process's devices: all join it when
        # any process still has CAMs to write (e.g. a resumed run).
        if not distributed.any_process(bool(rows)):
            continue
        cams = predict(batch, rows)
        for i in rows:
            h, w = int(batch["height"][i]), int(batch["width"][i])
            present = np.flatnonzero(batch["labels"][i] > 0.5)
            image_cams = {int(c): cams[i, :h, :w, c] for c in present}
            image_id = batch["id"][i].decode()
            safe_io.require_finite(image_cams.values(), (
                f"stage 'cam' ({method(config)}): the CAMs of {split} image {image_id} from "
                f"the classifier in {wd.ckpt_dir('cls')} (trained by stage 'cls')"))
            safe_io.write_cams(cam_path(wd, split, image_id), image_cams)
            written += 1
    distributed.barrier(f"cams-{split}-written")  # later readers need every process's files
    return written


def cam_metrics(wd: Workdir, data: Dataset) -> dict:
    """CAM mIoU on val at the fixed threshold, and the threshold curve (for reference only);
    None (not available) when the dataset has no val."""
    if not data.has_split("val"):
        return {"cam_miou": None, "cam_bg_threshold": scoring.DEFAULT_CAM_BG_THRESHOLD,
                "cam_miou_curve": {}}
    pairs = [(safe_io.read_cams(cam_path(wd, "val", ex["id"])), ex["mask"])
             for ex in data.examples("val", all_processes=True)]
    curve = scoring.cam_threshold_curve(pairs, CURVE_THRESHOLDS, data.num_classes)
    fixed = scoring.cam_threshold_curve(pairs, (scoring.DEFAULT_CAM_BG_THRESHOLD,),
                                         data.num_classes)
    return {"cam_miou": float(fixed[scoring.DEFAULT_CAM_BG_THRESHOLD]),
            "cam_bg_threshold": scoring.DEFAULT_CAM_BG_THRESHOLD,
            "cam_miou_curve": {str(t): float(v) for t, v in curve.items()}}


def summary_images(wd: Workdir, data: Dataset, split: str = "val") -> dict[str, np.ndarray]:
    """TensorBoard pictures of the first ``common.NUM_SUMMARY_IMAGES`` images of ``split``: the
    image, then each present class's CAM as a heat map (tag ``cam_<split>/<id>``)."""
    pictures = {}
    for ex in data.select(split, limit=common.NUM_SUMMARY_IMAGES):
        cams = safe_io.read_cams(cam_path(wd, split, ex["id"]))
        views = drawing.cam_pictures(ex["image"], cams, data.class_names)
        pictures[f"cam_{split}/{ex['id']}"] = drawing.strip([ex["image"], *views.values()])
    return pictures


def run(config, wd: Workdir, data: Dataset) -> dict:
    model = checkpoints.restore_model(build_model(config, num_classes=data.num_classes),
                                      wd.ckpt_dir("cls"), step=config.cls.num_steps,
                                      hint=common.made_by("cls"))
    predict = make_predictor(config, model)
    splits = [split for split in ("train", "val") if data.has_split(split)]
    counts = {split: write_split(config, wd, data, model, split, predict) for split in splits}
    if distributed.is_main():
        common.write_images(wd.log_dir("cam"), summary_images(wd, data, splits[-1]))
    return {**cam_metrics(wd, data), "written": counts,
            "written_per_process": distributed.gather_ints(counts)}
