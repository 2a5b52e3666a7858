"""Rematerialisation (pmm_jax/models/remat.py, model config key ``remat``): every backbone
family runs each block under remat; the loss, gradients and BatchNorm statistics are those of
the plain step (frozen BN, frozen stages, dropout and trainable BN included); XLA's temp memory
falls; the key reaches the backbone from the stage configs and does not make stages stale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax import models, stages
from pmm_jax.cams import classifier
from pmm_jax.models import remat as remat_lib
from pmm_jax.segmentation import segmenter
from pmm_jax.stages import record

FAST_COMPILE = dict(xla_backend_optimization_level=0)  # remat and plain alike
TINY_STRUCTURE = [[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14], [10, 6, 2, 1, 7]]

# A small-width member of each family, with its number of residual blocks.
FAMILIES = {
    "resnet": (dict(models.TINY_RESNET), 4),
    "resnet38": (dict(name="resnet38", width_div=32, blocks=(1, 1, 1, 1)), 6),
    "scalenet101": (dict(name="scalenet101", structure=TINY_STRUCTURE, layers=(1, 1, 1, 1),
                         width_div=16), 4),
    "resnet101": (dict(name="resnet101", blocks=(1, 1, 1, 1), width_div=16, frozen_stages=1),
                  4),
    "res2net101": (dict(name="res2net101", blocks=(1, 1, 1, 1), width_div=16), 4),
}


def feature_loss(model, x):
    """A loss that reaches every stage's feature."""
    return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in model(x))


def build(backbone: dict) -> nnx.Module:
    """The backbone, initialised in one jitted program (eager init compiles a kernel per
    parameter shape: 3x slower), in train mode."""
    model = nnx.jit(lambda: models.build_backbone(backbone, models.init_rngs(0)))()
    model.train()
    return model


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
@pytest.mark.parametrize("remat", [False, True])
def test_every_block_runs_under_remat(family, remat):
    """Each family's blocks (and nothing else) are ``remat`` calls in the traced forward pass
    (trace only, shape-only model: fast)."""
    backbone, num_blocks = FAMILIES[family]
    model = nnx.eval_shape(lambda: models.build_backbone(backbone, models.init_rngs(0),
                                                         remat=remat))
    model.train()
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 16, 16, 3))))(state)
    remats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "remat2"]
    assert len(remats) == (num_blocks if remat else 0)


# The numerical check (two compiles each): resnet38 with the classifier's frozen BN, frozen
# stage 1 and the b6/b7 Dropout2d in train mode (masks from the model's rng streams, which
# remat must advance exactly as the plain call does); the demo ResNet with trainable BN
# (batch statistics updated inside the remat blocks).
@pytest.mark.parametrize("family", ["resnet", "resnet38"])
def test_remat_keeps_loss_gradients_and_statistics(family):
    model = build(FAMILIES[family][0])
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
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
    stats = jax.tree.leaves(plain[2])
    assert stats
    for a, b in zip(jax.tree.leaves(remat[2]), stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def temp_bytes(model: nnx.Module) -> int:
    """XLA's temp buffer size of ``model``'s compiled train-mode gradient step on 4 x 64 x 64
    images, the remat barriers kept (as a GPU compile keeps them; the CPU pipeline drops them,
    see pmm_jax/models/remat.py). Optimisation level 0 compiles 3x faster, same buffers."""
    graphdef, state = nnx.split(model)
    x = jnp.zeros((4, 64, 64, 3))
    grad = jax.jit(lambda s: nnx.grad(feature_loss)(nnx.merge(graphdef, s), x))
    compiled = grad.lower(state).compile({**remat_lib.KEEP_BARRIERS, **FAST_COMPILE})
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_lowers_xla_temp_memory():
    """Two stages of two blocks: remat keeps the input of each block, not its ~7 activations
    (measured: 5.8 -> 3.2 MiB)."""
    backbone = dict(name="resnet", stem_width=16, widths=(16, 32), blocks=(2, 2), strides=(1, 2),
                    dilations=(1, 1))
    model = build(backbone)
    plain = temp_bytes(model)
    model.remat = True
    remat = temp_bytes(model)
    assert remat < 0.65 * plain, (remat, plain)


def stage_config(variant="tiny"):
    from configs import demo

    return demo.get_config(variant)


def built(build, config) -> nnx.Module:
    """The model ``build(config)`` makes, shape-only (nothing initialised: fast)."""
    return nnx.eval_shape(lambda: build(config))


def test_config_key_reaches_every_backbone_built_by_the_stages():
    config = stage_config()
    assert config.cls.model.remat is False and config.seg.model.remat is False
    assert built(classifier.build_model, config).backbone.remat is False
    config.cls.model.remat = True
    config.seg.model.remat = True
    assert built(classifier.build_model, config).backbone.remat is True
    assert built(segmenter.build_model, config).backbone.remat is True
    config.cls.method = "seam"
    assert built(classifier.build_model, config).backbone.remat is True


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
