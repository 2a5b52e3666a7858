"""Stage ``cls``: train the multi-label CAM classifier on image-level labels.

``config.cls.method`` (default "plain"): "plain" trains the CAM classifier with multilabel
soft-margin on GAP of the CAM head and ``trainer.sgd_poly``; "seam" trains
``pmm_jax.cams.seam.SEAM`` (CAM head + PCM) with the SEAM losses and its four-group optimiser
(``config.cls.official_momentum``, default False, reproduces the official momentum 5e-4).
With ``config.cls.multicrop.rough_masks`` set to a folder of rough masks, the classifier trains
on PMM's multi-crop tiles (``Dataset.train_batches``: ``multicrop.scales``,
``crop``, ``stride``; docs/multicrop.md) instead of random-scale crops.
Checkpoints go to ``WORKDIR/cls/ckpt`` and are resumed automatically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax import drawing, models
from pmm_jax.cams import seam
from pmm_jax.files.workdir import Workdir
from pmm_jax.models.cam_classifier import multilabel_soft_margin_loss
from pmm_jax.stages import common
from pmm_jax.training import checkpoints, precision, trainer

if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset


def method(config) -> str:
    """``config.cls.method``: "plain" (default) or "seam"; ValueError otherwise."""
    name = config.cls.get("method", "plain")
    if name not in ("plain", "seam"):
        raise ValueError(f"config.cls.method must be 'plain' or 'seam', got {name!r}")
    return name


def build_model(config, seed: int = 0, *, num_classes: int | None = None) -> nnx.Module:
    """The configured CAM classifier (``CAMClassifier`` or ``seam.SEAM``), randomly initialised,
    computing in ``config.compute_dtype``, with ``num_classes - 1`` outputs (the dataset's
    ``Dataset.num_classes``, background included; None: ``config.data.num_classes``, for
    callers without a dataset such as bench/)."""
    num_foreground = (num_classes or config.data.num_classes) - 1
    rngs = models.init_rngs(seed)
    if method(config) == "seam":
        options = {k: v for k, v in config.cls.model.items()
                   if k not in ("backbone", "init_from", *models.BACKBONE_OPTIONS)}
        unknown = sorted(set(options) - set(seam.SEAM_OPTIONS))
        if unknown:
            raise ValueError(f"unknown SEAM model options {unknown}; allowed: {list(seam.SEAM_OPTIONS)}")
        model = seam.SEAM(models.build_backbone(config.cls.model.backbone, rngs,
                                                remat=models.remat_option(config.cls.model)),
                          num_foreground, **options, rngs=rngs)
    else:
        model = models.build_classifier(config.cls.model, num_foreground, rngs)
    # Pretrained backbone (`python -m pmm_jax.convert` checkpoint) from config.cls.model.init_from.
    if config.cls.model.get("init_from"):
        models.load_pretrained(model.backbone, config.cls.model.init_from,
                               arch=config.cls.model.backbone.name)
    return precision.set_compute_dtype(model, precision.config_dtype(config))


def loss_fn(model, batch, rngs):
    """Multilabel soft-margin loss on the classifier's logits, with the exact-match accuracy."""
    out = model(batch["image"], rngs=rngs)
    loss = multilabel_soft_margin_loss(out["logits"], batch["labels"])
    correct = jnp.all((out["logits"] > 0) == (batch["labels"] > 0.5), axis=-1)
    return loss, {"exact_match": jnp.mean(correct)}


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
    model = build_model(config, config.seed, num_classes=data.num_classes)
    if method(config) == "seam":
        tx, schedule = seam.make_optimizer(
            model, cfg.lr, cfg.num_steps, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            official_momentum=cfg.get("official_momentum", False))
        train_loss = seam.seam_loss
    else:
        tx, schedule = trainer.sgd_poly(cfg.lr, cfg.num_steps, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
        train_loss = loss_fn
    trainer.train(model, train_loss, batches, tx,
                  num_steps=cfg.num_steps, ckpt_dir=ckpt_dir, log_dir=wd.log_dir("cls"),
                  seed=config.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                  lr_schedule=schedule, image_summary_fn=cam_summary, desc="cls")
    return {"num_steps": cfg.num_steps}
