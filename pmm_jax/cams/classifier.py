"""The CAM classifier methods: ``config.cls.method`` names one entry of :data:`CLASSIFIERS`.

An entry (:class:`ClassifierMethod`) holds everything a method is: how its network is built,
its training loss, its optimiser, and the CAM its inference reads. The built-in methods are
"plain" (the CAM classifier with multilabel soft-margin on GAP of the CAM head and
``optimizers.sgd_poly``) and "seam" (``pmm_jax.cams.seam.SEAM``, CAM head + PCM, the SEAM
losses and its four-group optimiser; ``config.cls.official_momentum`` reproduces the official
momentum 5e-4; its inference reads the PCM-refined CAM). A new method is one
``CLASSIFIERS.register(name, ClassifierMethod(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pmm_jax import models
from pmm_jax.cams import seam
from pmm_jax.models.cam_classifier import multilabel_soft_margin_loss
from pmm_jax.registry import Registry
from pmm_jax.training import optimizers, precision

Optimizer = tuple[optax.GradientTransformation, optax.Schedule]


@dataclasses.dataclass(frozen=True)
class ClassifierMethod:
    """One classifier method.

    Attributes:
      build: ``build(model_config, num_foreground, rngs) -> nnx.Module``, randomly
        initialised; the module has a ``backbone`` (ImageNet weights go there).
      loss: ``loss(model, batch, rngs) -> (loss, metrics)`` (``trainer.LossFn``).
      optimizer: ``optimizer(model, cls_config) -> (tx, schedule)``.
      cam: ``cam(model, images[B,H,W,3]) -> [B,h,w,C]`` foreground CAMs for inference.
    """

    build: Callable[[Any, int, nnx.Rngs], nnx.Module]
    loss: Callable
    optimizer: Callable[[nnx.Module, Any], Optimizer]
    cam: Callable[[nnx.Module, jax.Array], jax.Array]


CLASSIFIERS: Registry[ClassifierMethod] = Registry("classifier method")


def method(config) -> ClassifierMethod:
    """The entry of ``config.cls.method`` (default "plain"); UnknownNameError listing the
    registered ones otherwise."""
    return CLASSIFIERS.get(config.cls.get("method", "plain"))


def build_model(config, seed: int = 0, *, num_classes: int | None = None) -> nnx.Module:
    """The configured CAM classifier, randomly initialised (its backbone then loaded from
    ``config.cls.model.init_from`` when set), computing in ``config.compute_dtype``, with
    ``num_classes - 1`` outputs (the dataset's ``Dataset.num_classes``, background included;
    None: ``config.data.num_classes``, for callers without a dataset such as bench/)."""
    num_foreground = (num_classes or config.data.num_classes) - 1
    model = method(config).build(config.cls.model, num_foreground, models.init_rngs(seed))
    if config.cls.model.get("init_from"):
        models.load_pretrained(model.backbone, config.cls.model.init_from,
                               arch=config.cls.model.backbone.name)
    return precision.set_compute_dtype(model, precision.config_dtype(config))


def plain_loss(model, batch, rngs):
    """Multilabel soft-margin loss on the classifier's logits, with the exact-match accuracy."""
    out = model(batch["image"], rngs=rngs)
    loss = multilabel_soft_margin_loss(out["logits"], batch["labels"])
    correct = jnp.all((out["logits"] > 0) == (batch["labels"] > 0.5), axis=-1)
    return loss, {"exact_match": jnp.mean(correct)}


def plain_optimizer(model, cfg) -> Optimizer:
    """``optimizers.sgd_poly`` with ``config.cls``'s lr, steps, momentum and weight decay."""
    return optimizers.sgd_poly(cfg.lr, cfg.num_steps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


def build_seam(model_config, num_foreground: int, rngs: nnx.Rngs) -> seam.SEAM:
    """``seam.SEAM`` on the configured backbone; its options are ``seam.SEAM_OPTIONS``."""
    options = {k: v for k, v in model_config.items()
               if k not in ("backbone", "init_from", *models.BACKBONE_OPTIONS)}
    unknown = sorted(set(options) - set(seam.SEAM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown SEAM model options {unknown}; allowed: {list(seam.SEAM_OPTIONS)}")
    backbone = models.build_backbone(model_config.backbone, rngs,
                                     remat=models.remat_option(model_config))
    return seam.SEAM(backbone, num_foreground, **options, rngs=rngs)


def seam_optimizer(model, cfg) -> Optimizer:
    return seam.make_optimizer(model, cfg.lr, cfg.num_steps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay,
                               official_momentum=cfg.get("official_momentum", False))


CLASSIFIERS.register("plain", ClassifierMethod(
    build=lambda cfg, num_foreground, rngs: models.build_classifier(cfg, num_foreground, rngs),
    loss=plain_loss, optimizer=plain_optimizer, cam=lambda model, images: model(images)["cam"]))
# SEAM's inference reads the PCM-refined CAM without its background channel.
CLASSIFIERS.register("seam", ClassifierMethod(
    build=build_seam, loss=seam.seam_loss, optimizer=seam_optimizer,
    cam=lambda model, images: model(images)["cam_rv"][..., 1:]))
