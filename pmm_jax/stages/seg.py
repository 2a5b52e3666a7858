"""Stage ``seg``: train PSPNet segmenters on the pseudo-masks, and predict with them.

One segmenter per entry of ``config.seg.runs``, each named by its loss
(``pmm_jax.segmentation.losses.SEG_LOSSES``: ``ce``, the control, and ``pus``), all from the
same initial weights (``pmm_jax.segmentation.segmenter.initial_model``).
``train_segmenter`` and ``predict_split`` are shared with the ``cycle`` and ``eval`` stages.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
import numpy as np
import tqdm

from pmm_jax import drawing
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import best_checkpoint, inference, losses, runs, segmenter
from pmm_jax.stages import common
from pmm_jax.stages.stage import Stage
from pmm_jax.training import checkpoints, distributed, trainer


if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset


def mask_summary(model, batch) -> dict:
    """TensorBoard images: input, training mask and prediction side by side (``model`` in
    eval mode; its forward pass jitted, compiled once per run instead of op by op)."""
    pred = np.asarray(jax.device_get(
        segmenter.jitted_predict_labels(model, {"image": batch["image"][:4]})))
    images = drawing.denormalize(batch["image"][:4])
    target = drawing.colorize_mask(batch["mask"][:4])
    return {"image_mask_prediction": np.concatenate(
        [images, target, drawing.colorize_mask(pred)], axis=2)}


def train_segmenter(config, wd: Workdir, data: Dataset, run: str, mask_dir: str,
                    loss: str) -> None:
    """Trains (or resumes) segmenter ``run`` with loss ``loss`` (``losses.SEG_LOSSES``) on the
    masks in ``mask_dir`` (mmseg's augmentation when ``config.seg.augment == "mmseg"``:
    ``Dataset.train_batches``)."""
    cfg = config.seg
    eval_every = cfg.get("eval_every", 0) if data.has_split("val") else 0  # no val: last step
    ckpt_dir = wd.ckpt_dir(f"seg/{run}")
    start = checkpoints.latest_step(ckpt_dir) or 0
    batches = data.train_batches(
        cfg, "config.seg.batch_size", seed=config.seed, start_step=start, mask_dir=mask_dir,
        mask_producer="the 'pseudo' stage (or 'cycle' for cyclic masks)")
    common.warn_random_init(config, "seg")
    model = segmenter.initial_model(config, wd, data.num_classes)
    tx, schedule = segmenter.make_optimizer(config, model)
    trainer.train(model, losses.run_loss(config, loss), batches, tx,
                  num_steps=cfg.num_steps, ckpt_dir=ckpt_dir, log_dir=wd.log_dir(f"seg/{run}"),
                  seed=config.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                  lr_schedule=schedule, image_summary_fn=mask_summary, desc=f"seg {run}",
                  eval_fn=best_checkpoint.keep_best(config, wd, data, run) if eval_every else None,
                  eval_every=eval_every)


def predict_split(config, wd: Workdir, data: Dataset, run: str, split: str, out_dir: str,
                  stage: str = "eval") -> int:
    """Writes segmenter ``run``'s predicted mask of every image in ``split`` to ``out_dir``.

    Each process predicts its shard; images whose PNG already exists are skipped. Returns
    how many this process wrote, once every process has written its files. ``stage`` (the
    caller) is named, with the segmenter, when its predictions are not finite.
    """
    model = best_checkpoint.load_segmenter(config, wd, run, data.num_classes)
    source = (f"stage '{stage}': segmenter '{run}' "
              f"({best_checkpoint.segmenter_checkpoint(config, wd, run)[0]}, "
              f"trained by stage '{runs.trained_by(run)}') on {split}")
    # config.eval, config.crf.backend
    predict = inference.predictor(model, config, source=source)
    key = "config.eval.batch_size"
    batches = data.eval_batches(split, config.eval.batch_size, key)
    total = data.num_eval_batches(split, config.eval.batch_size, key)
    safe_io.remove_stale_temps(out_dir)
    written = 0
    for batch in tqdm.tqdm(batches, desc=f"predict {run} {split}", unit="batch", total=total,
                           disable=not distributed.is_main()):
        paths = {i: os.path.join(out_dir, f"{batch['id'][i].decode()}.png")
                 for i in np.flatnonzero(batch["valid"])}
        todo = [i for i, path in paths.items() if not os.path.exists(path)]
        # One computation over every process's devices: all join while any has work left.
        if not distributed.any_process(bool(todo)):
            continue
        labels = predict(batch)
        for i in todo:
            height, width = int(batch["height"][i]), int(batch["width"][i])
            safe_io.write_mask(paths[i], labels[i, :height, :width])
            written += 1
    distributed.barrier(f"predict-{run}-{split}-written")  # readers need every process's files
    return written


def run(config, wd: Workdir, data: Dataset) -> dict:
    mask_dir = wd.pseudo_masks(config.pseudo.train_on, "train")
    for loss in runs.seg_runs(config):
        train_segmenter(config, wd, data, loss, mask_dir, loss)
    return {"runs": runs.seg_runs(config), "num_steps": config.seg.num_steps}


STAGE = Stage(
    name="seg", run=run, requires="pseudo", sections=("seg", "eval"),
    writes=lambda config, wd: {wd.ckpt_dir(f"seg/{run}"): "checkpoint"
                               for run in runs.seg_runs(config)},
    owns=lambda config, wd: [os.path.join(wd.root, "seg", run) for run in runs.seg_runs(config)],
    reads=lambda config: ["cls"] if config.seg.model.get("init_from_cls") else [],
    final_step=lambda config: config.seg.num_steps)
