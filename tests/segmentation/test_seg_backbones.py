"""The paper-scale segmenter's training set-up: synchronised BatchNorm over a
sharded batch, mmseg's ``frozen_stages``, and the four segmentation backbones by name.

* Sync BN: one step of the trainer's jitted train step (``trainer.make_step``, what
  ``trainer.train`` runs for the seg stage) with the seg stage's optimiser and PUS loss, on a
  batch sharded over the suite's 4 virtual CPU devices, must give the same BN running
  statistics, loss and updated parameters as the same step on one device with the whole
  batch. The batch is built so that per-device statistics would differ (each device's rows
  have their own brightness): the first trainable BN's running variance is checked against
  both the global-batch value and the per-shard value, which are far apart.
* ``frozen_stages=1`` (WSSS_MMSeg's ResNetV1c PSPNet config): the stem and layer1 get
  ``FrozenBatchNorm`` and no update (no step, momentum or weight decay); everything else moves.
* ResNet38 and ScaleNet101 build by name as WSSS_MMSeg's PSPNet backbones (trainable BN,
  nothing frozen, segmentation dilations, ResNet38's conv3..conv6 features).

Backbones are slim (few blocks, narrow) and their shapes are checked abstractly (nothing
compiled); the numerics of each block are pinned by the weight-import tests
(test_convert*.py, test_scalenet.py). The two train steps cost ~20 s of CPU (XLA compiles).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import configs
from pmm_jax import models
from pmm_jax.models.backbone import FrozenBatchNorm
from pmm_jax.models.resnet_v1c import max_pool_3x3_s2, run_sequence
from pmm_jax.segmentation import losses, segmenter
from pmm_jax.training import optimizers, trainer
from pmm_jax.training import sharding as shd

TINY_V1C = dict(name="resnet101", blocks=(1, 1, 1, 1), base_width=4, stem_width=8)
BATCH, SIZE, NUM_CLASSES = 8, 16, 3


def tiny_seg_config(frozen_stages: int):
    """configs/voc.py's segmenter settings (SGD, poly, weight decay, PUS) on a tiny
    ResNetV1c PSPNet with 3 classes."""
    config = configs.get_config("voc")
    config.data.num_classes = NUM_CLASSES
    config.seg.model = ml_collections.ConfigDict(dict(
        backbone=dict(TINY_V1C, frozen_stages=frozen_stages), bins=(1, 2), channels=8,
        aux_channels=4, dropout=0.1, init_from=""))
    config.seg.lr = 0.05
    return config


def host_batch():
    """Images whose 4 device shards (2 rows each) differ in brightness, labels with void."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
    image += np.repeat(np.arange(4, dtype=np.float32) * 1.5 - 2.0, BATCH // 4)[:, None, None, None]
    mask = rng.integers(0, NUM_CLASSES, (BATCH, SIZE, SIZE)).astype(np.int32)
    mask[:, :3] = 255
    return {"image": image, "mask": mask}


def initial_state(config):
    """``segmenter.build_model``'s graph and a state filled on the host (He-normal kernels, BN
    identity): initialising eagerly compiles one kernel per shape, far slower on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: segmenter.build_model(config, config.seed)))
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = path_str(path).rsplit("/", 1)[-1]
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0, impl="rbg")
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

    values = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    return graphdef, state


def fresh_model(graphdef, state):
    """A model from ``initial_state`` (new PRNG key arrays: each step donates its own)."""
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jax.random.key(0, impl="rbg")
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state))


def one_step(config, graphdef, state, mesh):
    """(model state before, after, metrics, model) of one seg train step on ``mesh``: the seg
    stage's optimiser and loss, the trainer's jitted step (compiled at LLVM -O0, as the model
    tests do, to keep the suite fast)."""
    model = fresh_model(graphdef, state)
    before = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                          else np.array(x), nnx.to_pure_dict(nnx.state(model)))
    tx, _ = segmenter.make_optimizer(config, model)
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step_graph, step_state = nnx.split((model, optimizer))
    step_state = shd.replicate(step_state, mesh)
    batch = shd.shard_batch(host_batch(), mesh, config_key="config.seg.batch_size")
    assert len(batch["image"].sharding.device_set) == mesh.size
    step = trainer.make_step(step_graph, losses.run_loss(config, "pus"), config.seed, mesh)
    compiled = step.lower(step_state, batch).compile({"xla_backend_optimization_level": 0})
    new_state, metrics = compiled(step_state, batch)
    after = jax.device_get(nnx.to_pure_dict(new_state[0]))
    return before, after, jax.device_get(metrics), model


def first_trainable_bn_input(model) -> np.ndarray:
    """Input of layer2.0.bn1 (the first BN that is not frozen). The stem and layer1 are frozen,
    so this is the same in train and eval mode."""

    @nnx.jit
    def probe(backbone, x):
        x = run_sequence(backbone.layer1, max_pool_3x3_s2(run_sequence(backbone.stem, x)))
        return backbone.layer2[0].conv1(x)

    return np.asarray(probe(model.backbone, jnp.asarray(host_batch()["image"])))


@pytest.fixture(scope="module")
def steps():
    config = tiny_seg_config(frozen_stages=1)
    graphdef, state = initial_state(config)
    probe = first_trainable_bn_input(fresh_model(graphdef, state))
    sharded = one_step(config, graphdef, state, shd.make_mesh())
    single = one_step(config, graphdef, state,
                      Mesh(np.asarray(jax.devices()[:1]), (shd.DATA_AXIS,)))
    return config, sharded, single, probe


def flat(tree) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` of a model state's numeric leaves (PRNG keys left out)."""
    return {path_str(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)}


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@pytest.mark.xdist_group("seg_steps")  # one worker computes `steps` once
def test_bn_statistics_and_updates_are_over_the_global_batch(steps):
    _, (_, after4, metrics4, _), (_, after1, metrics1, _), y = steps
    assert jax.device_count() == 4
    np.testing.assert_allclose(metrics4["loss"], metrics1["loss"], rtol=1e-5)
    a4, a1 = flat(after4), flat(after1)
    assert a4.keys() == a1.keys()
    assert sum(k.endswith("/var") for k in a4) > 20
    for key in sorted(a4):
        np.testing.assert_allclose(a4[key], a1[key], rtol=2e-4, atol=2e-6, err_msg=key)

    # The check above can fail: per-device statistics would be far from the global ones on
    # this batch. Running variance of layer2.0.bn1 after one step (torch momentum 0.1, from 1):
    global_var = 0.9 + 0.1 * y.reshape(-1, y.shape[-1]).var(axis=0)
    per_device_var = 0.9 + 0.1 * y.reshape(4, -1, y.shape[-1]).var(axis=1).mean(axis=0)
    observed = a4["backbone/layer2/0/bn1/var"]
    np.testing.assert_allclose(observed, global_var, rtol=1e-4)
    assert np.max(np.abs(observed - per_device_var) / observed) > 100 * 1e-4


@pytest.mark.xdist_group("seg_steps")  # one worker computes `steps` once
def test_frozen_stages_get_no_update_and_frozen_bn(steps):
    _, (before, after, _, model), _, _ = steps
    b, a = flat(before), flat(after)
    frozen = {k for k in b if k.split("/")[:2] in (["backbone", "stem"], ["backbone", "layer1"])}
    assert frozen and any(k.endswith("/var") for k in frozen)
    for key in sorted(b):
        if key.endswith("/count") or key.startswith("decode_head/dropout") \
                or key.startswith("aux_head/dropout"):
            continue
        if key in frozen:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert not np.array_equal(a[key], b[key]), f"{key} did not move"
    assert model.backbone.frozen_prefixes == ("stem", "layer1")
    norms = {path_str(p): type(m) for p, m in nnx.iter_modules(model.backbone)
             if isinstance(m, (FrozenBatchNorm, nnx.BatchNorm))}
    for path, kind in norms.items():
        in_frozen = path.split("/")[0] in ("stem", "layer1")
        assert kind is (FrozenBatchNorm if in_frozen else nnx.BatchNorm), path
    labels = optimizers.frozen_param_labels(model)
    assert any(labels.values()) and not all(labels.values())


def test_nothing_frozen_keeps_the_plain_optimizer():
    """Default / demo: no mask at all, so the optimiser (and every demo figure) is unchanged."""
    for config in (tiny_seg_config(frozen_stages=-1), configs.get_config("demo")):
        model = nnx.eval_shape(lambda: segmenter.build_model(config))
        assert getattr(model.backbone, "frozen_prefixes", ()) == ()
        assert not any(optimizers.frozen_param_labels(model).values())
        tx, _ = segmenter.make_optimizer(config, model)
        plain, _ = optimizers.sgd_poly(config.seg.lr, config.seg.num_steps,
                                    decay_1d=config.seg.decay_1d)
        params = nnx.state(model, nnx.Param)
        assert jax.tree.structure(jax.eval_shape(tx.init, params)) == \
            jax.tree.structure(jax.eval_shape(plain.init, params))


def test_frozen_stages_config_keys():
    """Official values (WSSS_MMSeg): its Res2Net PSPNet configs freeze nothing; its ResNetV1c
    base config freezes the stem and layer1. Bad values are clear errors."""
    for name in ("voc", "coco"):
        backbone = configs.get_config(name).seg.model.backbone
        assert backbone.name == "res2net101" and backbone.frozen_stages == -1
    assert "frozen_stages" not in configs.get_config("demo").seg.model.backbone
    r101 = nnx.eval_shape(lambda: models.build_backbone(
        dict(TINY_V1C, deep_stem=False, frozen_stages=1), nnx.Rngs(0)))
    assert r101.frozen_prefixes == ("conv1", "bn1", "layer1")
    assert isinstance(r101.bn1, FrozenBatchNorm) and isinstance(r101.layer2[0].bn1, nnx.BatchNorm)
    r2n = nnx.eval_shape(lambda: models.build_backbone(
        dict(name="res2net101", blocks=(1, 1, 1, 1), frozen_stages=2), nnx.Rngs(0)))
    assert r2n.frozen_prefixes == ("conv1", "bn1", "layer1", "layer2")
    assert isinstance(r2n.layer2[0].bns[0], FrozenBatchNorm)
    assert isinstance(r2n.layer3[0].bns[0], nnx.BatchNorm)
    with pytest.raises(ValueError, match="frozen_stages must be in -1..4"):
        models.build_backbone(dict(name="resnet101", frozen_stages=5), nnx.Rngs(0))


TINY_STRUCTURE = [[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14], [10, 6, 2, 1, 7]]


def segmenter_abstract(backbone: dict, num_classes: int = 21):
    return nnx.eval_shape(lambda: models.build_segmenter(
        dict(backbone=backbone, channels=8, aux_channels=4), num_classes, nnx.Rngs(0)))


def conv_dilation(conv) -> int:
    d = conv.kernel_dilation
    return d if isinstance(d, int) else d[0]


@pytest.mark.parametrize("name", ["resnet38", "scalenet101"])
def test_cam_backbones_build_by_name_as_wsss_segmentation_backbones(name):
    """Slim widths (1/32 and 1/16 of the official ones, one block per stage), abstract."""
    if name == "resnet38":
        tiny = dict(name="resnet38", width_div=32, blocks=(1, 1, 1, 1))
    else:
        tiny = dict(name="scalenet101", structure=TINY_STRUCTURE, layers=(1, 1, 1, 1),
                    width_div=16)
    model = segmenter_abstract(tiny)
    bb = model.backbone
    assert bb.out_strides == (4, 8, 8, 8)
    assert bb.frozen_prefixes == ()
    norms = [m for _, m in nnx.iter_modules(bb) if isinstance(m, (FrozenBatchNorm, nnx.BatchNorm))]
    assert norms and all(isinstance(m, nnx.BatchNorm) for m in norms)  # trained, synchronised
    if name == "resnet38":
        # WideRes38's [conv3, conv4, conv5, conv6] (official widths 256, 512, 1024, 4096):
        # PSP head on conv6, auxiliary head on conv5; b5/b6/b7 dilations 2/4/4.
        assert bb.out_channels == (8, 16, 32, 128)
        assert model.decode_head.ppm.convs[0].conv.in_features == 128
        assert model.aux_head.conv.conv.in_features == 32
        assert [conv_dilation(c) for c in (bb.b5.conv_branch2b1, bb.b6.conv_branch2b1,
                                           bb.b7.conv_branch2b1)] == [2, 4, 4]
        expected = (1, 9, 8, 21)  # stride-2 convs: ceil
    else:
        assert bb.out_channels == (16, 32, 64, 128)  # official 256, 512, 1024, 2048
        assert model.aux_head.conv.conv.in_features == 64
        assert [conv_dilation(getattr(bb, f"layer{k}")[0].conv2[0]) for k in (1, 2, 3, 4)] == \
            [1, 1, 2, 4]
        expected = (1, 8, 8, 21)  # max-pool strides: floor, as the official F.max_pool2d
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 65, 63, 3), jnp.float32))
    assert out["logits"].shape == out["aux_logits"].shape == expected

    # The classifier keeps the class defaults (frozen BN, stage 1 frozen) ...
    classifier_bb = nnx.eval_shape(lambda: models.build_backbone(tiny, nnx.Rngs(0)))
    assert classifier_bb.frozen_prefixes[:2] in (("conv1a", "b2"), ("conv1", "bn1"))
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(classifier_bb))
    # ... and a config field overrides the segmenter default.
    assert models.segmenter_backbone_config(dict(tiny, frozen_stages=0))["frozen_stages"] == 0
