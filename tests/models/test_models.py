"""Tests for pmm_jax.models: shapes and strides, torch-equivalent pooling/resizing/loss, BN
modes, the registry, and jitted functional training steps.

XLA compilation dominates on CPU, so: shape tests run under ``jax.eval_shape`` (nothing is
compiled) on the 8/16/32/64 TINY_RESNET; tests that run networks use SMALL_RESNET, whose
uniform width means few distinct parameter shapes (each costs one initialiser compile), "rbg"
PRNG keys (several times cheaper to compile than threefry) and LLVM -O0 for their jits.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pmm_jax import models

# Stage strides (4, 4); the second stage is dilated.
SMALL_RESNET = dict(name="resnet", stem_width=8, widths=(8, 8), blocks=(1, 1), strides=(2, 1),
                    dilations=(1, 2))
SIZES = [(32, 32), (40, 56)]
FAST_COMPILE = dict(xla_backend_optimization_level=0)


def rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def abstract(build):
    """The model ``build(rngs)`` would return, with shape-only state (nothing compiled)."""
    return nnx.eval_shape(lambda: build(rngs()))


def output_shapes(model, shape):
    """Shapes of ``model(zeros(shape))`` via eval_shape."""
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct(shape, jnp.float32))
    return jax.tree.map(lambda a: a.shape, out)


def model_cfg(backbone, **options):
    return ml_collections.ConfigDict(dict(backbone=backbone, **options))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("size", SIZES)
def test_backbone_feature_shapes_and_output_stride(block, size):
    cfg = ml_collections.ConfigDict(dict(models.TINY_RESNET, block=block))
    backbone = abstract(lambda r: models.build_backbone(cfg, r))
    assert backbone.out_channels == (8, 16, 32, 64)
    assert backbone.out_strides == (2, 4, 8, 8)
    shapes = output_shapes(backbone, (2, *size, 3))
    assert shapes == [(2, math.ceil(size[0] / s), math.ceil(size[1] / s), c)
                      for s, c in zip(backbone.out_strides, backbone.out_channels)]


@pytest.mark.parametrize("size", SIZES)
def test_classifier_and_pspnet_output_shapes(size):
    h, w = math.ceil(size[0] / 8), math.ceil(size[1] / 8)
    classifier = abstract(lambda r: models.build_classifier(model_cfg(models.TINY_RESNET), 20, r))
    assert output_shapes(classifier, (2, *size, 3)) == {"cam": (2, h, w, 20), "logits": (2, 20)}
    segmenter = abstract(lambda r: models.build_segmenter(
        model_cfg(models.TINY_RESNET, channels=32, aux_channels=16), 21, r))
    assert output_shapes(segmenter, (2, *size, 3)) == {"logits": (2, h, w, 21),
                                                       "aux_logits": (2, h, w, 21)}


def torch_adaptive_avg_pool(x, n, m):
    """Reference: torch's adaptive_avg_pool2d loop on NHWC numpy."""
    rows, cols = x.shape[1], x.shape[2]
    out = np.zeros((x.shape[0], n, m, x.shape[3]))
    for i in range(n):
        r0, r1 = math.floor(i * rows / n), math.ceil((i + 1) * rows / n)
        for j in range(m):
            c0, c1 = math.floor(j * cols / m), math.ceil((j + 1) * cols / m)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("in_size", [(5, 7), (4, 4), (13, 6)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch_definition(in_size, bins):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype(np.float32)
    got = models.adaptive_avg_pool(jnp.asarray(x), bins)
    np.testing.assert_allclose(got, torch_adaptive_avg_pool(x, bins, bins), rtol=1e-5, atol=1e-6)


def torch_bilinear(x, out_h, out_w):
    """Reference: torch F.interpolate(mode='bilinear', align_corners=False) on NHWC numpy."""

    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = taps(x.shape[1], out_h)
    c0, c1, fc = taps(x.shape[2], out_w)
    rows = x[:, r0] * (1 - fr)[None, :, None, None] + x[:, r1] * fr[None, :, None, None]
    return rows[:, :, c0] * (1 - fc)[None, None, :, None] + rows[:, :, c1] * fc[None, None, :, None]


@pytest.mark.parametrize("in_size,out_size", [((5, 7), (40, 56)), ((6, 6), (4, 3)),
                                              ((1, 1), (3, 3)), ((2, 3), (7, 5))])
def test_bilinear_resize_matches_torch_align_corners_false(in_size, out_size):
    x = np.random.default_rng(1).normal(size=(2, *in_size, 3)).astype(np.float32)
    assert models.upsample_logits(jnp.asarray(x, jnp.bfloat16), out_size).dtype == jnp.float32
    np.testing.assert_allclose(models.resize_bilinear(jnp.asarray(x), out_size),
                               torch_bilinear(x, *out_size), rtol=1e-5, atol=1e-5)


def test_multilabel_soft_margin_loss_matches_torch_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(4, 20))
    labels = (rng.random((4, 20)) < 0.3).astype(np.float32)
    sig = 1 / (1 + np.exp(-logits))
    expected = np.mean(-np.mean(labels * np.log(sig) + (1 - labels) * np.log(1 - sig), axis=1))
    got = models.multilabel_soft_margin_loss(jnp.asarray(logits, jnp.float32),
                                             jnp.asarray(labels))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    extreme = models.multilabel_soft_margin_loss(jnp.array([[100.0, -100.0]]),
                                                 jnp.array([[0.0, 1.0]]))
    np.testing.assert_allclose(extreme, 100.0, rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def eval_forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def classifier_loss(out, labels):
    return models.multilabel_soft_margin_loss(out["logits"], labels)


def segmenter_loss(out, labels):
    def ce(logits):
        logits = models.upsample_logits(logits, labels.shape[1:])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return ce(out["logits"]) + 0.4 * ce(out["aux_logits"])


def functional_step(model, loss_of):
    """The trainer's pattern: split once, merge inside ``jax.jit``, grads w.r.t. Params.

    Returns ``step(params, rest, x, labels) -> (loss, outputs, grads, new_rest)`` and the split
    ``(params, rest)``; ``new_rest`` carries the updated BN statistics and RNG counts.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, rest, x, labels):
        merged = nnx.merge(graphdef, params, rest)

        def loss_fn(m):
            out = m(x)
            return loss_of(out, labels), out

        (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(merged)
        return loss, out, grads, nnx.state(merged, nnx.Not(nnx.Param))

    return step, params, rest


def assert_finite_nonzero_grads(loss, grads):
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert optax.tree.norm(grads) > 0


def assert_all_batch_stats_moved(old_rest, new_rest):
    old, new = (jax.tree.leaves(nnx.filter_state(r, nnx.BatchStat)) for r in (old_rest, new_rest))
    assert old and all(not np.allclose(u, v) for u, v in zip(old, new))


def images(seed, n, size=(16, 16)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *size, 3)), jnp.float32)


def test_classifier_jitted_step_trains_with_batch_statistics():
    # dropout 0: in train mode sample 0's CAM may then only depend on its batch through BN.
    classifier = models.build_classifier(model_cfg(SMALL_RESNET, dropout=0.0), 3, rngs())
    step, params, rest = functional_step(classifier, classifier_loss)
    a, b, c = images(3, 3)[:, None]
    labels = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, out_ab, grads, new_rest = step(params, rest, jnp.concatenate([a, b]), labels)
    _, out_ac, _, _ = step(params, rest, jnp.concatenate([a, c]), labels)
    assert_finite_nonzero_grads(loss, grads)
    assert_all_batch_stats_moved(rest, new_rest)
    assert not np.allclose(out_ab["cam"][0], out_ac["cam"][0], atol=1e-4)


def test_eval_mode_output_is_independent_of_the_batch():
    classifier = models.build_classifier(model_cfg(SMALL_RESNET), 3, rngs())
    classifier.eval()
    graphdef, state = nnx.split(classifier)
    a, b, c = images(3, 3)[:, None]
    out_ab = eval_forward(graphdef, state, jnp.concatenate([a, b]))
    out_ac = eval_forward(graphdef, state, jnp.concatenate([a, c]))
    np.testing.assert_allclose(out_ab["cam"][0], out_ac["cam"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_ab["logits"], out_ab["cam"].mean(axis=(1, 2)), rtol=1e-5,
                               atol=1e-6)


def test_segmenter_jitted_step_gives_finite_grads_and_new_batch_stats():
    segmenter = models.build_segmenter(model_cfg(SMALL_RESNET, channels=8, aux_channels=8), 3,
                                       rngs())
    step, params, rest = functional_step(segmenter, segmenter_loss)
    labels = jnp.asarray(np.random.default_rng(4).integers(0, 3, (2, 24, 20)))
    loss, out, grads, new_rest = step(params, rest, images(4, 2, (24, 20)), labels)
    assert out["logits"].shape == out["aux_logits"].shape == (2, 6, 5, 3)
    assert_finite_nonzero_grads(loss, grads)
    assert_all_batch_stats_moved(rest, new_rest)


def test_registry_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown backbone name 'resnet9000'; registered: .*'resnet'"):
        models.build_backbone(ml_collections.ConfigDict(dict(name="resnet9000")), rngs())
    with pytest.raises(ValueError, match="unknown backbone name None"):
        models.build_backbone(dict(widths=(8,)), rngs())
    with pytest.raises(ValueError, match="unknown model options \\['bins'\\]"):
        models.build_classifier(model_cfg(SMALL_RESNET, bins=(1, 2)), 3, rngs())
    with pytest.raises(ValueError, match="one entry per stage"):
        models.build_backbone(dict(SMALL_RESNET, dilations=(1,)), rngs())
    with pytest.raises(ValueError, match="unknown block"):
        models.build_backbone(dict(SMALL_RESNET, block="wide"), rngs())
    with pytest.raises(ValueError, match="at least 2 stages"):
        abstract(lambda r: models.PSPNet(
            models.ResNet(widths=(8,), blocks=(1,), strides=(1,), dilations=(1,), rngs=r),
            3, rngs=r))


def test_registry_accepts_lists_from_json_configs():
    cfg = {key: list(value) if isinstance(value, tuple) else value
           for key, value in SMALL_RESNET.items()}
    segmenter = abstract(lambda r: models.build_segmenter(
        {"backbone": cfg, "bins": [1, 2], "channels": 8, "aux_channels": 4}, 3, r))
    assert segmenter.backbone.out_channels == (8, 8)
    assert segmenter.decode_head.ppm.bins == (1, 2)


def test_batchnorm_running_variance_is_the_biased_one_unlike_torch():
    """docs/fidelity.md: the segmenter's BN (``resnet.BN_MOMENTUM``, as torch's momentum 0.1)
    updates its running mean as torch (Sync)BatchNorm does, but its running variance with the
    biased batch variance where torch uses the unbiased one (a factor n / (n - 1))."""
    torch = pytest.importorskip("torch")
    from pmm_jax.models import resnet

    x = np.random.default_rng(0).normal(size=(2, 3, 1, 4)).astype(np.float32)  # n = 6 per channel
    bn = nnx.BatchNorm(4, momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                       rngs=nnx.Rngs(0))
    bn(jnp.asarray(x))
    ref = torch.nn.BatchNorm2d(4, momentum=0.1, eps=resnet.BN_EPSILON).train()
    ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(bn.mean[...], ref.running_mean.numpy(), rtol=1e-5, atol=1e-7)
    n, flat = 6, x.reshape(-1, 4)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0), rtol=1e-5)
    np.testing.assert_allclose(ref.running_var.numpy(), 0.9 + 0.1 * flat.var(0) * n / (n - 1),
                               rtol=1e-5)
