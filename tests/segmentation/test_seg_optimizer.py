"""The segmenter's optimiser (``pmm_jax.stages.segmenter.make_optimizer``) against a transcription of
mmseg's: WSSS_MMSeg trains its PSPNets with ``torch.optim.SGD(model.parameters(), lr,
momentum=0.9, weight_decay=5e-4)`` (mmcv's default optimizer constructor: one group, every
parameter, weight decay added to the gradient before momentum) and mmcv's
``PolyLrUpdaterHook`` (``lr = (base_lr - min_lr) * (1 - iter / max_iters) ** power + min_lr``
set before iteration ``iter``); parameters of ``frozen_stages`` have ``requires_grad=False``,
get no gradient and PyTorch's SGD skips them (no decay, no momentum).

Three steps of random gradients on a tiny PSPNet (ResNetV1c, ``frozen_stages=1``) with
configs/voc.py's seg settings; the weight decay is raised so that it dominates the update and
a parameter kind it missed could not pass. Every parameter kind is compared separately: conv
kernels, conv biases (the classifiers), BatchNorm scales, BatchNorm offsets, frozen stages.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import configs
from pmm_jax.segmentation import segmenter
from pmm_jax.training import optimizers

torch = pytest.importorskip("torch")

TINY_V1C = dict(name="resnet101", blocks=(1, 1, 1, 1), base_width=4, stem_width=8,
                frozen_stages=1)
NUM_STEPS = 3


def tiny_config(**seg_overrides):
    """configs/voc.py's seg section on a tiny PSPNet, the schedule shortened to 3 steps (so
    the poly decay and min_lr matter within them) and a weight decay that dominates."""
    config = configs.get_config("voc")
    config.data.num_classes = 3
    config.seg.model = ml_collections.ConfigDict(dict(
        backbone=TINY_V1C, bins=(1, 2), channels=8, aux_channels=4, dropout=0.1, init_from=""))
    config.seg.update(dict(lr=0.05, min_lr=0.01, num_steps=NUM_STEPS, weight_decay=0.1))
    config.seg.update(seg_overrides)
    return config


def param_kind(path: tuple[str, ...], names: set[tuple[str, ...]], frozen: bool) -> str:
    """frozen / kernel / conv_bias / bn_scale / bn_offset for a parameter path."""
    if frozen:
        return "frozen"
    if path[-1] == "bias":
        return "bn_offset" if path[:-1] + ("scale",) in names else "conv_bias"
    return {"kernel": "kernel", "scale": "bn_scale"}[path[-1]]


def flat_params(model, paths, rng):
    """``{path: float32 array}`` of random values for every parameter of ``model`` (``paths``:
    the parameter paths in leaf order, as ``optimizers.frozen_param_labels`` lists them)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {path: rng.normal(size=leaf.shape).astype(np.float32)
            for path, leaf in zip(paths, leaves, strict=True)}


def jax_steps(config, model, params, grads):
    """``params`` after ``segmenter.make_optimizer``'s updates for each gradient in ``grads``."""
    tx, _ = segmenter.make_optimizer(config, model)
    state = nnx.state(model, nnx.Param)
    paths = list(params)
    treedef = jax.tree.structure(state)
    tree = lambda flat: jax.tree.unflatten(treedef, [flat[p] for p in paths])

    @jax.jit
    def step(p, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    p = tree(params)
    opt_state = tx.init(p)
    for g in grads:
        p, opt_state = step(p, opt_state, tree(g))
    return dict(zip(paths, (np.asarray(x) for x in jax.tree.leaves(p))))


def mmseg_steps(seg_cfg, params, grads, frozen):
    """The same steps in PyTorch: SGD over every parameter, frozen ones ``requires_grad=False``
    (no ``.grad``), the lr set before each iteration by mmcv's poly rule."""
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy()), requires_grad=not frozen[k])
               for k, v in params.items()}
    opt = torch.optim.SGD(list(tensors.values()), lr=seg_cfg.lr, momentum=seg_cfg.momentum,
                          weight_decay=seg_cfg.weight_decay)
    for it, g in enumerate(grads):
        coeff = (1 - it / seg_cfg.num_steps) ** 0.9
        opt.param_groups[0]["lr"] = (seg_cfg.lr - seg_cfg.min_lr) * coeff + seg_cfg.min_lr
        for k, t in tensors.items():
            t.grad = None if frozen[k] else torch.from_numpy(g[k].copy())
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def run_both(config):
    """``(initial, jax result, mmseg result, kind of each path)`` after 3 steps."""
    model = nnx.eval_shape(lambda: segmenter.build_model(config))
    frozen = optimizers.frozen_param_labels(model)
    rng = np.random.default_rng(0)
    params = flat_params(model, list(frozen), rng)
    grads = [{k: 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(NUM_STEPS)]
    kinds = {k: param_kind(k, set(params), frozen[k]) for k in params}
    return (params, jax_steps(config, model, params, grads),
            mmseg_steps(config.seg, params, grads, frozen), kinds)


def test_voc_segmenter_optimizer_equals_mmseg_sgd_on_every_parameter_kind():
    params, ours, official, kinds = run_both(tiny_config())
    assert set(kinds.values()) == {"frozen", "kernel", "conv_bias", "bn_scale", "bn_offset"}
    for kind in sorted(set(kinds.values())):
        for k in (k for k in params if kinds[k] == kind):
            np.testing.assert_allclose(ours[k], official[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{kind} {'/'.join(k)}")
            if kind == "frozen":
                np.testing.assert_array_equal(ours[k], params[k])
            else:  # the decay dominates the update: every trained parameter moved
                assert np.abs(ours[k] - params[k]).max() > 1e-2, k


def test_decay_1d_false_leaves_biases_and_batchnorm_undecayed():
    """The option: only kernels decayed, so the 1-D kinds end where mmseg's would without
    weight decay, and differ from mmseg's with it."""
    config = tiny_config(decay_1d=False)
    params, ours, official, kinds = run_both(config)
    no_decay = tiny_config(weight_decay=0.0)
    _, _, undecayed, _ = run_both(no_decay)
    for k, kind in kinds.items():
        if kind == "kernel":
            np.testing.assert_allclose(ours[k], official[k], rtol=1e-5, atol=1e-6)
        elif kind != "frozen":
            np.testing.assert_allclose(ours[k], undecayed[k], rtol=1e-5, atol=1e-6)
            assert np.abs(ours[k] - official[k]).max() > 1e-2, k


def test_paper_and_demo_configs_decay_every_parameter():
    for name in ("voc", "coco", "demo"):
        assert configs.get_config(name).seg.decay_1d is True, name
