"""The segmenter losses: a run of ``config.seg.runs`` (and ``config.cycle.loss``) names one
entry of :data:`SEG_LOSSES`.

An entry is a factory ``make(config) -> loss_fn`` with ``loss_fn(model, batch, rngs) ->
(loss, metrics)`` (``trainer.LossFn``; ``batch["mask"]`` holds the pseudo-masks, 255
ignored). Built in: "ce" (plain cross-entropy) and "pus" (the Pretended Under-fitting
Strategy loss of ``config.seg.pus``), both on the decode head plus ``config.seg.aux_weight``
times the auxiliary head. A new loss is one ``SEG_LOSSES.register(name, make)``.
"""

from __future__ import annotations

import functools
from typing import Callable

from pmm_jax.models.pspnet import upsample_logits
from pmm_jax.registry import Registry
from pmm_jax.segmentation import pus

SEG_LOSSES: Registry[Callable] = Registry("segmentation loss")


def head_losses(model, batch, rngs, *, mode: str, beta: float, kappa: float, reduction: str,
                aux_weight: float):
    """Decode-head loss + ``aux_weight`` x auxiliary-head loss, each its own PUS warm-up test."""
    out = model(batch["image"], rngs=rngs)
    size = batch["mask"].shape[1:3]
    head_loss = functools.partial(pus.pus_loss, labels=batch["mask"], mode=mode, beta=beta,
                                  kappa=kappa, reduction=reduction)
    main = head_loss(upsample_logits(out["logits"], size))
    aux = head_loss(upsample_logits(out["aux_logits"], size))
    return main + aux_weight * aux, {"main_loss": main, "aux_loss": aux}


def _pus_loss(config, mode: str) -> Callable:
    p = config.seg.pus
    return functools.partial(head_losses, mode=mode, beta=p.beta, kappa=p.kappa,
                             reduction=p.reduction, aux_weight=config.seg.aux_weight)


SEG_LOSSES.register("ce", lambda config: _pus_loss(config, "none"))
SEG_LOSSES.register("pus", lambda config: _pus_loss(config, config.seg.pus.mode))


def run_loss(config, loss: str) -> Callable:
    """The loss function of loss ``loss`` (``UnknownNameError`` listing the registered losses
    for another name)."""
    return SEG_LOSSES.get(loss)(config)
