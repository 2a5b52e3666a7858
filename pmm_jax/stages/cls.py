"""Stage ``cls``: train the multi-label CAM classifier on image-level labels.

``config.cls.method`` (default "plain") names the classifier method, its model, loss and
optimiser (``pmm_jax.cams.classifier.CLASSIFIERS``). With ``config.cls.multicrop.rough_masks``
set to a folder of rough masks, the classifier trains on PMM's multi-crop tiles
(``Dataset.train_batches``: ``multicrop.scales``, ``crop``, ``stride``; docs/multicrop.md)
instead of random-scale crops.
Checkpoints go to ``WORKDIR/cls/ckpt`` and are resumed automatically.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from pmm_jax import drawing
from pmm_jax.cams import classifier
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import common
from pmm_jax.stages.stage import Stage
from pmm_jax.training import checkpoints, trainer


if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset


@nnx.jit
def _cams(model, images: jax.Array) -> jax.Array:
    return model(images)["cam"]


def cam_summary(model, batch) -> dict:
    """TensorBoard images: the first few training images beside their max-over-class CAM
    (``model`` in eval mode; its forward pass jitted)."""
    cams = np.asarray(jax.device_get(_cams(model, batch["image"][:4])))
    return {"cam_overlay": drawing.cam_overlay_batch(batch["image"][:4], cams, batch["labels"][:4])}


def run(config, wd: Workdir, data: Dataset) -> dict:
    cfg = config.cls
    ckpt_dir = wd.ckpt_dir("cls")
    start = checkpoints.latest_step(ckpt_dir) or 0
    # Multi-crop tiles when config.cls.multicrop.rough_masks is set, else random-scale crops.
    batches = data.train_batches(cfg, "config.cls.batch_size", seed=config.seed,
                                 start_step=start)
    common.warn_random_init(config, "cls")
    model = classifier.build_model(config, config.seed, num_classes=data.num_classes)
    chosen = classifier.method(config)
    tx, schedule = chosen.optimizer(model, cfg)
    trainer.train(model, chosen.loss, batches, tx,
                  num_steps=cfg.num_steps, ckpt_dir=ckpt_dir, log_dir=wd.log_dir("cls"),
                  seed=config.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                  lr_schedule=schedule, image_summary_fn=cam_summary, desc="cls")
    return {"num_steps": cfg.num_steps}


STAGE = Stage(
    name="cls", run=run, requires=None, sections=("cls",),
    writes=lambda config, wd: {wd.ckpt_dir("cls"): "checkpoint"},
    owns=lambda config, wd: [os.path.join(wd.root, "cls")],
    final_step=lambda config: config.cls.num_steps)
