"""Rematerialisation (pmm_jax/models/remat.py, model config key ``remat``): same loss,
gradients and BatchNorm statistics as without it for every backbone family (frozen BN, frozen
stages and dropout included), less XLA temp memory, and the key reaches the backbone from the
stage configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax import models, stages
from pmm_jax.stages import cls, record, seg

FAST_COMPILE = dict(xla_backend_optimization_level=0)  # remat and plain alike
TINY_STRUCTURE = [[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14], [10, 6, 2, 1, 7]]

# A small-width member of each family with something that remat must not disturb: frozen BN
# and a frozen stage (resnet38, scalenet101: the classifier defaults; resnet101: mmseg's
# frozen_stages=1 beside trainable BN), trainable BN (resnet, res2net101, resnet38 "batch"),
# the b6/b7 Dropout2d of resnet38 (train mode: masks drawn from the model's rng streams).
FAMILIES = {
    "resnet": dict(models.TINY_RESNET),
    "resnet38": dict(name="resnet38", width_div=32, blocks=(1, 1, 1, 1)),
    "resnet38_batch_norm": dict(name="resnet38", width_div=32, blocks=(1, 1, 1, 1),
                                norm="batch", frozen_stages=-1),
    "scalenet101": dict(name="scalenet101", structure=TINY_STRUCTURE, layers=(1, 1, 1, 1),
                        width_div=16),
    "resnet101": dict(name="resnet101", blocks=(1, 1, 1, 1), width_div=16, frozen_stages=1),
    "res2net101": dict(name="res2net101", blocks=(1, 1, 1, 1), width_div=16),
}


def feature_loss(model, x):
    """A loss that reaches every stage's feature."""
    return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in model(x))


def train_step(model: nnx.Module, x):
    """``(loss, grads, batch statistics after the step)`` of one train-mode step, as
    ``trainer.make_step`` differentiates (``nnx.value_and_grad`` under ``jax.jit``); the
    model itself is left as it was."""
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(state):
        m = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(feature_loss)(m, x)
        return loss, grads, nnx.state(m, nnx.BatchStat)

    return step(state)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remat_keeps_loss_gradients_and_statistics(family):
    model = models.build_backbone(FAMILIES[family], models.init_rngs(0))
    model.train()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain = train_step(model, x)
    model.remat = True
    remat = train_step(model, x)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    grads = jax.tree.leaves(plain[1])
    scale = max(np.abs(g).max() for g in grads)
    assert scale > 0
    # Gradients that cancel to ~0 (a BN bias before the next BN) differ by rounding only.
    for a, b in zip(jax.tree.leaves(remat[1]), grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    for a, b in zip(jax.tree.leaves(remat[2]), jax.tree.leaves(plain[2]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def temp_bytes(remat: bool) -> int:
    """XLA's temp buffer size of a compiled train-mode gradient step of a 4-stage, 2-blocks
    per stage ResNet on a batch of 4 x 64 x 64 images."""
    backbone = dict(models.TINY_RESNET, widths=(16, 32, 32, 32), blocks=(2, 2, 2, 2))
    model = models.build_backbone(backbone, models.init_rngs(0), remat=remat)
    model.train()
    graphdef, state = nnx.split(model)
    x = jnp.zeros((4, 64, 64, 3))
    grad = jax.jit(lambda s: nnx.grad(feature_loss)(nnx.merge(graphdef, s), x))
    return grad.lower(state).compile().memory_analysis().temp_size_in_bytes


def test_remat_lowers_xla_temp_memory():
    plain, remat = temp_bytes(False), temp_bytes(True)
    assert remat < 0.6 * plain, (remat, plain)


def stage_config(variant="tiny"):
    from configs import demo

    return demo.get_config(variant)


def test_config_key_reaches_every_backbone_built_by_the_stages():
    config = stage_config()
    assert config.cls.model.remat is False and config.seg.model.remat is False
    assert cls.build_model(config).backbone.remat is False
    config.cls.model.remat = True
    config.seg.model.remat = True
    assert cls.build_model(config).backbone.remat is True
    assert seg.build_model(config).backbone.remat is True
    config.cls.method = "plain"
    assert cls.build_model(config).backbone.remat is True


def test_remat_is_a_model_key_not_a_backbone_key():
    with pytest.raises(ValueError, match="config.cls.model.remat"):
        models.build_backbone(dict(models.TINY_RESNET, remat=True), models.init_rngs(0))


def test_remat_does_not_make_completed_stages_stale():
    """It changes memory and time, not results: not among the keys a stage's marker records."""
    config = stage_config()
    config.cls.model.remat = True
    recorded = record.relevant_config(config, "eval", stages.ORDER)
    assert "cls.model.backbone.name" in recorded
    assert not [key for key in recorded if key.endswith(".remat")]


def test_paper_configs_carry_a_typed_key():
    from configs import coco, voc

    for config in (voc.get_config(), coco.get_config(), voc.get_config("rehearsal")):
        for model in (config.cls.model, config.seg.model):
            assert isinstance(model.remat, bool)
            with pytest.raises(TypeError):
                model.remat = "yes"  # ml_collections keeps the bool type of an override
