"""Stage ``cam``: class activation maps for the train and val splits.

The classifier of stage ``cls`` runs through the CAM method ``config.cam.method`` names
(``pmm_jax.cams.methods``), reading the CAM its classifier method declares
(``pmm_jax.cams.classifier``). The CAMs, restricted to the image-level label (as WSSS does for
train and for CAM evaluation on val) and normalised per class by their maximum, are written
one file per image in the official PMM/SEAM format (``WORKDIR/cams/<split>/<id>.npy``). The
stage reports CAM mIoU on val at the fixed background threshold
``scoring.DEFAULT_CAM_BG_THRESHOLD`` and the threshold curve.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import tqdm

from pmm_jax import drawing
from pmm_jax.cams import classifier, methods
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir, made_by
from pmm_jax.stages import common
from pmm_jax.stages.stage import Stage
from pmm_jax import scoring
from pmm_jax.training import checkpoints, distributed


if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset

CURVE_THRESHOLDS = tuple(round(0.05 + 0.05 * i, 2) for i in range(10))


def make_predictor(config, model) -> methods.Predict:
    """The configured CAM method's predictor for ``model``, reading the CAM its classifier
    method declares."""
    return methods.make_predictor(config, model, classifier.method(config).cam)


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
                f"stage 'cam' ({methods.method_name(config)}): the CAMs of {split} image {image_id} from "
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
    model = checkpoints.restore_model(classifier.build_model(config, num_classes=data.num_classes),
                                      wd.ckpt_dir("cls"), step=config.cls.num_steps,
                                      hint=made_by("cls"))
    predict = make_predictor(config, model)
    splits = [split for split in ("train", "val") if data.has_split(split)]
    counts = {split: write_split(config, wd, data, model, split, predict) for split in splits}
    if distributed.is_main():
        common.write_images(wd.log_dir("cam"), summary_images(wd, data, splits[-1]))
    return {**cam_metrics(wd, data), "written": counts,
            "written_per_process": distributed.gather_ints(counts)}


STAGE = Stage(
    name="cam", run=run, requires="cls", sections=("cam",),
    writes=lambda config, wd: {wd.cams("train"): "files", wd.cams("val"): "files"},
    owns=lambda config, wd: [os.path.join(wd.root, "cams"), wd.log_dir("cam")])
