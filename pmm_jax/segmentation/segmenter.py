"""The segmenter (PSPNet on a configured backbone): how it is built, where its training
starts from, its optimiser, and its per-pixel labels.

Every run starts from the same initial weights (:func:`initial_model`: seeded, the backbone
from ``config.seg.model.init_from`` or, with ``config.seg.model.init_from_cls``, from the
``cls`` stage's classifier).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pmm_jax import models
from pmm_jax.cams import classifier
from pmm_jax.files.workdir import Workdir, made_by
from pmm_jax.models.pspnet import upsample_logits
from pmm_jax.training import checkpoints, optimizers, precision


def build_model(config, seed: int = 0, *, num_classes: int | None = None) -> nnx.Module:
    """The configured segmenter of ``num_classes`` classes (the dataset's
    ``Dataset.num_classes``; None: ``config.data.num_classes``, for callers without a dataset
    such as bench/), randomly initialised (every run starts from these weights), its backbone
    loaded from ``config.seg.model.init_from`` (a ``pmm_jax.convert`` checkpoint, e.g.
    ImageNet weights) when set; it computes in ``config.compute_dtype``."""
    model = models.build_segmenter(config.seg.model, num_classes or config.data.num_classes,
                                   models.init_rngs(seed))
    if config.seg.model.get("init_from"):
        models.load_pretrained(model.backbone, config.seg.model.init_from,
                               arch=config.seg.model.backbone.name)
    return precision.set_compute_dtype(model, precision.config_dtype(config))


def initial_model(config, wd: Workdir, num_classes: int) -> nnx.Module:
    """The segmenter of ``num_classes`` classes a training run starts from: ``build_model``
    seeded with ``config.seed``, its backbone then overwritten with the ``cls`` stage's
    trained classifier backbone (every parameter and BN statistic) when
    ``config.seg.model.init_from_cls`` is set."""
    if config.seg.model.get("init_from_cls") and config.seg.model.get("init_from"):
        raise ValueError("config.seg.model.init_from and config.seg.model.init_from_cls are both "
                         "set; choose one starting point for the segmenter backbone")
    model = build_model(config, config.seed, num_classes=num_classes)
    if config.seg.model.get("init_from_cls"):
        load_cls_backbone(config, wd, model, num_classes)
    return model


def load_cls_backbone(config, wd: Workdir, model: nnx.Module, num_classes: int) -> nnx.Module:
    """Copies the backbone of the ``cls`` checkpoint in ``wd`` into ``model.backbone``.

    The stand-in for an ImageNet backbone where there is none (the synthetic demo): the
    classifier saw the same images. ValueError when the two backbones differ (the error lists
    the mismatched weights); FileNotFoundError when stage cls has not run.
    """
    ckpt_dir = wd.ckpt_dir("cls")
    trained = checkpoints.restore_model(
        classifier.build_model(config, num_classes=num_classes), ckpt_dir,
        step=config.cls.num_steps,
        hint="config.seg.model.init_from_cls needs the classifier: " + made_by("cls"))
    return models.copy_weights(
        trained.backbone, model.backbone, what=f"the cls backbone in {ckpt_dir}",
        hint="config.seg.model.init_from_cls needs config.seg.model.backbone to build the same "
             "network as config.cls.model.backbone (set init_from_cls=False otherwise)")


def make_optimizer(config, model: nnx.Module):
    """mmseg's SGD with poly decay (``config.seg``); returns ``(tx, schedule)``.

    As WSSS_MMSeg's ``SGD(lr, momentum, weight_decay)`` over every parameter, the weight decay
    reaches BatchNorm scales and offsets and conv biases too; ``config.seg.decay_1d=False``
    (absent: True) decays only the kernels. Parameters of the backbone's frozen stages get no
    update at all (``optimizers.freeze``); with none frozen ``tx`` is exactly
    ``optimizers.sgd_poly``'s.
    """
    cfg = config.seg
    tx, schedule = optimizers.sgd_poly(cfg.lr, cfg.num_steps, momentum=cfg.momentum,
                                       weight_decay=cfg.weight_decay,
                                       end_lr=cfg.get("min_lr", 0.0),
                                       decay_1d=cfg.get("decay_1d", True))
    return optimizers.freeze(tx, model), schedule


def predict_labels(model, batch) -> jax.Array:
    """Per-pixel argmax labels ``[B, H, W]`` at input resolution (uint8)."""
    logits = upsample_logits(model(batch["image"])["logits"], batch["image"].shape[1:3])
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# Compiled once per model structure and input shape, shared by every caller.
jitted_predict_labels = nnx.jit(predict_labels)
