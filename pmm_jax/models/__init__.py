"""Networks and the name registry that builds them from a config.

Model config (``ml_collections.ConfigDict`` or any mapping; lists are accepted wherever tuples
are, so a config read back from JSON works)::

    backbone:      name: a key of BACKBONES; every other field is a keyword argument of
                   that backbone (for "resnet": stem_width, widths, blocks, strides,
                   dilations, block, stem_stride, in_channels; see TINY_RESNET)
    remat:         True runs every backbone block under ``nnx.remat`` (recomputed in the
                   backward pass: less activation memory, same results;
                   ``pmm_jax.models.remat``); default False
    classifier options (build_classifier):  dropout (0.5)
    segmenter options (build_segmenter):    bins ((1, 2, 3, 6)), channels (512),
                                            dropout (0.1), aux_channels (256)

``build_segmenter`` starts the backbone's keyword arguments from
``SEGMENTER_BACKBONE_DEFAULTS[name]`` (the config's fields win): ResNet38 and ScaleNet101 are
built as WSSS_MMSeg's PSPNet trains them (trainable SyncBN, no frozen stage, segmentation
dilations; ResNet38's features conv3..conv6), not as the CAM classifier uses them.
ResNetV1c / Res2Net defaults already are the segmentation ones (strides (1, 2, 1, 1),
dilations (1, 1, 2, 4)); their ``frozen_stages`` (mmseg's; -1 by default) is a backbone
field too, e.g. ``backbone=dict(name="resnet101", frozen_stages=1)``.

A backbone is any callable ``f(**kwargs, rngs=rngs) -> nnx.Module`` whose module keeps the
contract ``pmm_jax.models.backbone.Backbone`` (``[B,H,W,3]`` to a list of per-stage NHWC
features; ``out_channels``, ``out_strides``, ``frozen_prefixes``). Adding a network (ResNet38-d, ScaleNet101,
Res2Net101, ...) is one more entry in ``BACKBONES``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx

from pmm_jax.models.backbone import Backbone
from pmm_jax.models.cam_classifier import CAMClassifier, multilabel_soft_margin_loss
from pmm_jax.models.pspnet import PSPNet, adaptive_avg_pool, resize_bilinear, upsample_logits
from pmm_jax.models.pretrained import copy_weights, count_params, load_pretrained
from pmm_jax.models.res2net import Res2Net, res2net101
from pmm_jax.models.resnet import ResNet
from pmm_jax.models.resnet_v1c import ResNetV1c, resnet50, resnet101
from pmm_jax.models.resnet38 import ResNet38
from pmm_jax.models.scalenet import ScaleNet, scalenet101

__all__ = [
    "Backbone",
    "BACKBONES",
    "BACKBONE_OPTIONS",
    "SEGMENTER_BACKBONE_DEFAULTS",
    "CAMClassifier",
    "PSPNet",
    "Res2Net",
    "ResNet",
    "ResNetV1c",
    "ResNet38",
    "ScaleNet",
    "TINY_RESNET",
    "adaptive_avg_pool",
    "build_backbone",
    "build_classifier",
    "build_segmenter",
    "remat_option",
    "copy_weights",
    "count_params",
    "load_pretrained",
    "multilabel_soft_margin_loss",
    "resize_bilinear",
    "segmenter_backbone_config",
    "upsample_logits",
]

BACKBONES: dict[str, Callable[..., nnx.Module]] = {"resnet": ResNet, "resnet38": ResNet38,
                                                   "scalenet101": scalenet101,
                                                   "resnet50": resnet50, "resnet101": resnet101,
                                                   "res2net101": res2net101}

# Widths 8/16/32/64, one basic block per stage, stage strides (2, 4, 8, 8): output stride 8.
# For tests and smoke runs: `ConfigDict(TINY_RESNET)` is a complete backbone config.
TINY_RESNET = dict(
    name="resnet",
    stem_width=8,
    widths=(8, 16, 32, 64),
    blocks=(1, 1, 1, 1),
    strides=(1, 2, 2, 1),
    dilations=(1, 1, 1, 2),
    block="basic",
)

_CLASSIFIER_OPTIONS = ("dropout",)
# Options any model config may carry that are not constructor arguments: ``init_from``, a
# pretrained backbone checkpoint (pmm_jax.convert) the stage loads after building the model;
# ``init_from_cls`` (segmenters), start the backbone from the ``cls`` stage's classifier.
_LOAD_OPTIONS = ("init_from", "init_from_cls")
# Options of the model config that the backbone gets (see the module docstring).
BACKBONE_OPTIONS = ("remat",)
_SEGMENTER_OPTIONS = ("bins", "channels", "dropout", "aux_channels")

# Segmenter backbone settings of WSSS_MMSeg (mmseg/models/backbones/{resnet38d,scalenet}.py and
# configs/pspnet_wsss/*): SyncBN trained (norm_eval=False), nothing frozen, ResNet38 b5/b6/b7
# dilations 2/4/4 with the features [conv3, conv4, conv5, conv6] (PSPNet's auxiliary head on
# conv5, 1024 channels), ScaleNet dilations (1, 1, 2, 4). The classifier keeps the classes'
# own defaults (frozen BN, stage 1 frozen).
SEGMENTER_BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet38": dict(dilations=(2, 4, 4), norm="batch", frozen_stages=-1, out_indices=(1, 2, 3, 5)),
    "scalenet101": dict(dilations=(1, 1, 2, 4), norm="batch", frozen_stages=-1),
}


def init_rngs(seed: int) -> nnx.Rngs:
    """Rngs for building a model: "rbg" keys, because initialising every layer eagerly with
    the default threefry keys compiles one XLA kernel per parameter shape (3x slower on CPU)."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def build_backbone(cfg: Mapping[str, Any], rngs: nnx.Rngs, *, remat: bool = False
                   ) -> nnx.Module:
    """The backbone ``BACKBONES[cfg.name]`` built with the remaining fields of ``cfg``;
    ``remat`` is the model config's key (``pmm_jax.models.remat``)."""
    kwargs = dict(cfg.items())
    name = kwargs.pop("name", None)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone name {name!r}; registered: {sorted(BACKBONES)}")
    if "remat" in kwargs:
        raise ValueError("remat is a key of the model config (e.g. config.cls.model.remat), "
                         "not of model.backbone")
    backbone = BACKBONES[name](**kwargs, remat=remat, rngs=rngs)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone {name!r} ({type(backbone).__name__}) does not keep the "
                        "backbone contract (pmm_jax.models.backbone.Backbone: out_channels, "
                        "out_strides, frozen_prefixes, __call__)")
    return backbone


def remat_option(cfg: Mapping[str, Any]) -> bool:
    """The model config's ``remat`` (False when absent)."""
    return bool(cfg.get("remat", False))


def _head_options(cfg: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The fields of ``cfg`` other than ``backbone``; ValueError on any not in ``allowed``."""
    options = {key: value for key, value in cfg.items()
               if key != "backbone" and key not in _LOAD_OPTIONS + BACKBONE_OPTIONS}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model options {unknown}; allowed: {list(allowed)}")
    return options


def build_classifier(cfg: Mapping[str, Any], num_foreground: int, rngs: nnx.Rngs) -> CAMClassifier:
    """CAM classifier over ``num_foreground`` foreground classes from a model config."""
    options = _head_options(cfg, _CLASSIFIER_OPTIONS)
    return CAMClassifier(build_backbone(cfg["backbone"], rngs, remat=remat_option(cfg)),
                         num_foreground, **options, rngs=rngs)


def segmenter_backbone_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone config ``build_segmenter`` builds: ``SEGMENTER_BACKBONE_DEFAULTS`` of its
    name, overridden by the given fields."""
    given = dict(cfg.items())
    return {**SEGMENTER_BACKBONE_DEFAULTS.get(given.get("name"), {}), **given}


def build_segmenter(cfg: Mapping[str, Any], num_classes: int, rngs: nnx.Rngs) -> PSPNet:
    """PSPNet over ``num_classes`` classes (background included) from a model config; the
    backbone gets ``SEGMENTER_BACKBONE_DEFAULTS`` (see the module docstring)."""
    options = _head_options(cfg, _SEGMENTER_OPTIONS)
    backbone = build_backbone(segmenter_backbone_config(cfg["backbone"]), rngs,
                              remat=remat_option(cfg))
    return PSPNet(backbone, num_classes, **options, rngs=rngs)
