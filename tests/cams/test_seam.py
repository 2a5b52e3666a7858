"""pmm_jax.cams.seam against PyTorch transcriptions of the official SEAM/PMM code (written from its
definitions, in bench/classifier_torch.py, shared with the classifier benchmark), parameter
groups, frozen parameters and a few jitted training steps."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pmm_jax.cams import seam
from pmm_jax.models.backbone import FrozenBatchNorm
from pmm_jax.models.resnet38 import ResNet38
from pmm_jax.models.scalenet import ScaleNet

torch = pytest.importorskip("torch")
F = torch.nn.functional
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # bench/ is not installed
from bench.classifier_torch import torch_losses, torch_pcm  # noqa: E402
from tests.support.nnx_values import materialize


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [(3, 7), (11, 5), (1, 4)])
def test_resize_align_corners_matches_torch(size):
    x = np.random.RandomState(0).randn(2, 6, 9, 3).astype(np.float32)
    ref = F.interpolate(nchw(x), size, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(seam.resize_align_corners(jnp.asarray(x), size), nhwc(ref),
                               rtol=1e-5, atol=1e-6)


def test_pcm_matches_official():
    rng = np.random.RandomState(1)
    cam = rng.randn(2, 5, 6, 4).astype(np.float32)
    f = rng.randn(2, 5, 6, 7).astype(np.float32)
    w9 = rng.randn(7, 5).astype(np.float32)  # [in, out]
    ours = seam.pcm(seam.pcm_seeds(jnp.asarray(cam)), jnp.asarray(f) @ jnp.asarray(w9))
    ref = torch_pcm(nchw(cam), nchw(f), torch.from_numpy(w9.T.copy())[:, :, None, None])
    np.testing.assert_allclose(ours, nhwc(ref), rtol=1e-4, atol=1e-6)


def test_pcm_gradient_is_finite_and_official_on_a_zero_padded_crop():
    # The bottom rows and right columns are the crop's zero padding: image 0, features 0.
    rng = np.random.RandomState(2)
    cam = rng.randn(2, 6, 6, 3).astype(np.float32)
    f = rng.randn(2, 6, 6, 7).astype(np.float32)
    f[:, 4:], f[:, :, 5:] = 0.0, 0.0
    w9 = rng.randn(7, 5).astype(np.float32)
    probe = rng.randn(2, 6, 6, 4).astype(np.float32)

    def objective(f, w9):
        return jnp.sum(seam.pcm(seam.pcm_seeds(jnp.asarray(cam)), f @ w9) * probe)

    grads = jax.grad(objective, argnums=(0, 1))(jnp.asarray(f), jnp.asarray(w9))
    assert all(np.isfinite(g).all() for g in grads)
    tf, tw = nchw(f).requires_grad_(), torch.from_numpy(w9.T.copy())[:, :, None, None]
    tw.requires_grad_()
    (torch_pcm(nchw(cam), tf, tw) * nchw(probe)).sum().backward()
    np.testing.assert_allclose(grads[0], nhwc(tf.grad), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], tw.grad[:, :, 0, 0].numpy().T, rtol=1e-4, atol=1e-4)


def test_resnet38_convs_start_from_torch_default_init():
    """Every backbone conv is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's default, kept
    by the official ResNet38-d); He init made random-init SEAM diverge (docs/models.md)."""
    # Built in one jitted program (eagerly, each parameter shape compiles its own).
    backbone = nnx.jit(lambda: ResNet38(width_div=8, blocks=(1, 1, 1, 1), rngs=nnx.Rngs(0)))()
    kernels = [(path, p[...]) for path, p in nnx.iter_graph(backbone)
               if isinstance(p, nnx.Param) and p[...].ndim == 4]
    assert len(kernels) == 21  # conv1a, 3 per basic block, 4 per bottleneck
    for path, k in kernels:
        bound = 1 / np.sqrt(np.prod(k.shape[:-1]))
        assert float(jnp.max(jnp.abs(k))) <= bound, path
        if k.size >= 4096:
            np.testing.assert_allclose(float(jnp.std(k)), bound / np.sqrt(3), rtol=0.1,
                                       err_msg=str(path))


def whole_affinity_pcm(seeds, features):
    """The PCM with the whole ``[hw, hw]`` affinity at once (before it was done in blocks)."""
    b, h, w, k = seeds.shape
    f = features.reshape(b, h * w, -1)
    f = f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + seam.EPS)
    aff = jax.nn.relu(jnp.einsum("bid,bjd->bij", f, f))
    aff = aff / (jnp.sum(aff, axis=1, keepdims=True) + seam.EPS)
    return jnp.einsum("bij,bik->bjk", aff, seeds.reshape(b, h * w, k)).reshape(b, h, w, k)


@pytest.mark.parametrize("block", [16, 45, 90])  # 6 blocks of 15, 2 of 45, one (no blocks)
def test_pcm_in_column_blocks_equals_the_whole_affinity(monkeypatch, block):
    monkeypatch.setattr(seam, "PCM_BLOCK", block)
    rng = np.random.default_rng(2)
    seeds = jnp.asarray(rng.random((2, 9, 10, 4)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((2, 9, 10, 6)), jnp.float32)
    np.testing.assert_allclose(seam.pcm(seeds, f), whole_affinity_pcm(seeds, f), rtol=1e-6, atol=1e-7)
    loss = lambda pcm: lambda f: jnp.sum(pcm(seeds, f) ** 2)  # training differentiates it
    np.testing.assert_allclose(jax.grad(loss(seam.pcm))(f), jax.grad(loss(whole_affinity_pcm))(f),
                               rtol=1e-5, atol=1e-6)


def test_losses_match_official():
    rng = np.random.RandomState(2)
    b, c = 3, 4
    size1, size2 = (20, 17), (6, 5)
    arrays = dict(cam1=rng.randn(b, 5, 4, c), rv1=rng.rand(b, 5, 4, c + 1),
                  cam2=rng.randn(b, 2, 2, c), rv2=rng.rand(b, 2, 2, c + 1))
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    labels = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], np.float32)
    ours = seam.seam_losses({"cam": arrays["cam1"], "cam_rv": arrays["rv1"]},
                            {"cam": arrays["cam2"], "cam_rv": arrays["rv2"]},
                            jnp.asarray(labels), size1, size2)
    ref = torch_losses(*(nchw(arrays[k]) for k in ("cam1", "rv1", "cam2", "rv2")),
                       torch.from_numpy(labels), size1, size2)
    for key, value in ref.items():
        np.testing.assert_allclose(ours[key], value.item(), rtol=1e-4, err_msg=key)


class TinyBackbone(nnx.Module):
    """Three features from a biased conv and a BatchNorm: exercises every parameter group."""

    frozen_prefixes = ("stem",)

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv = nnx.Conv(4, 4, (3, 3), use_bias=True, rngs=rngs)
        self.bn = FrozenBatchNorm(4)
        self.out_channels = (4, 4, 4)

    def __call__(self, x):
        y = self.bn(self.conv(jax.nn.relu(self.stem(x))))
        return [y, y, y]


def test_param_labels_and_group_learning_rates():
    model = seam.SEAM(TinyBackbone(nnx.Rngs(0)), 3, pcm_widths=(2, 2), rngs=nnx.Rngs(1))
    labels = seam.param_labels(model)
    assert labels == {
        ("backbone", "stem", "kernel"): "frozen", ("backbone", "stem", "bias"): "frozen",
        ("backbone", "conv", "kernel"): "backbone_weight",
        ("backbone", "conv", "bias"): "backbone_bias",
        ("backbone", "bn", "scale"): "frozen", ("backbone", "bn", "bias"): "frozen",
        ("classifier", "kernel"): "new_weight", ("f8_3", "kernel"): "new_weight",
        ("f8_4", "kernel"): "new_weight", ("f9", "kernel"): "new_weight"}
    # Each group's first update: -multiplier * lr * grad (momentum buffers start empty).
    lr, wd = 0.1, 1e-3
    tx, _ = seam.make_optimizer(model, lr, 1000, weight_decay=wd, official_momentum=True)
    params = nnx.state(model, nnx.Param)
    ones = jax.tree_util.tree_map(jnp.ones_like, params)
    state = tx.init(params)
    updates, state = tx.update(ones, state, params)
    conv = updates["backbone"]["conv"]
    np.testing.assert_allclose(conv["bias"][...], -2 * lr, rtol=1e-6)
    np.testing.assert_allclose(conv["kernel"][...],
                               -lr * (1 + wd * params["backbone"]["conv"]["kernel"][...]),
                               rtol=1e-5)
    np.testing.assert_allclose(updates["f9"]["kernel"][...],
                               -10 * lr * (1 + wd * params["f9"]["kernel"][...]), rtol=1e-5)
    assert not np.any(updates["backbone"]["stem"]["kernel"][...])
    assert not np.any(updates["backbone"]["bn"]["scale"][...])
    # official_momentum: the second bias update carries momentum = weight decay.
    updates, _ = tx.update(ones, state, params)
    lr1 = lr * (1 - 1 / 1000) ** 0.9
    np.testing.assert_allclose(updates["backbone"]["conv"]["bias"][...], -2 * lr1 * (1 + wd),
                               rtol=1e-5)


def test_jitted_training_steps_decrease_loss_and_keep_frozen_params():
    backbone = ResNet38(width_div=32, blocks=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    model = seam.SEAM(backbone, 3, pcm_widths=(4, 8), rngs=nnx.Rngs(1))
    model.train()
    tx, _ = seam.make_optimizer(model, 0.003, 100)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.randn(4, 40, 40, 3), jnp.float32),
             "labels": jnp.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], jnp.float32)}
    frozen_before = np.asarray(model.backbone.b2.conv_branch2a.kernel[...]).copy()
    bn_before = np.asarray(model.backbone.b4.bn_branch2a.scale[...]).copy()
    trained_before = np.asarray(model.backbone.b4.conv_branch2a.kernel[...]).copy()

    @nnx.jit
    def step(model, optimizer, batch, key):
        def objective(model):
            return seam.seam_loss(model, batch, nnx.Rngs(dropout=key))
        (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, metrics["loss_cls"]

    # The ECR and rvmin terms chase targets that move with the CAMs, so on 4 random images
    # the total fluctuates; the classification term must fall.
    losses, cls = zip(*[map(float, step(model, optimizer, batch, jax.random.key(0)))
                        for _ in range(8)])
    assert np.all(np.isfinite(losses)), losses
    assert cls[-1] < cls[0] and min(losses[1:]) < losses[0], (losses, cls)
    np.testing.assert_array_equal(model.backbone.b2.conv_branch2a.kernel[...], frozen_before)
    np.testing.assert_array_equal(model.backbone.b4.bn_branch2a.scale[...], bn_before)
    assert np.any(np.asarray(model.backbone.b4.conv_branch2a.kernel[...]) != trained_before)


def test_jitted_seam_step_on_tiny_scalenet_keeps_stem_layer1_and_bn_frozen():
    """PMM's ScaleNet classifier: conv1/bn1/layer1 and every BN parameter stay as they are, BN
    statistics never move (inference-mode BN), the rest of the backbone and the head train."""
    structure = [[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14], [10, 6, 2, 1, 7]]
    model = materialize(nnx.eval_shape(lambda: seam.SEAM(
        ScaleNet(structure=structure, layers=(1, 1, 1, 1), width_div=16, rngs=nnx.Rngs(0)),
        3, dropout=0.0, pcm_widths=(4, 8), rngs=nnx.Rngs(1))))
    model.train()
    labels = seam.param_labels(model)
    assert {path[1] for path, group in labels.items()
            if group == seam.FROZEN and path[-1] == "kernel"} == {"conv1", "layer1"}
    tx, _ = seam.make_optimizer(model, 0.01, 100)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params_before = {path: np.asarray(v[...]) for path, v in
                     nnx.to_flat_state(nnx.state(model, nnx.Param))}
    stats_before = {path: np.asarray(v[...]) for path, v in
                    nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    rng = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rng.randn(2, 48, 48, 3), jnp.float32),
             "labels": jnp.asarray([[1, 0, 1], [0, 1, 0]], jnp.float32)}

    @nnx.jit
    def step(model, optimizer, batch):
        (loss, _), grads = nnx.value_and_grad(
            lambda m: seam.seam_loss(m, batch, None), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    assert np.isfinite(float(step(model, optimizer, batch)))
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        np.testing.assert_array_equal(value[...], stats_before[path], err_msg=str(path))
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        group = labels[tuple(map(str, path))]
        changed = bool(np.any(np.asarray(value[...]) != params_before[path]))
        assert changed == (group != seam.FROZEN), (path, group)
