"""pmm_jax.convert against PyTorch: randomly initialised PyTorch networks laid out like the
official ones (module names = state-dict keys of PSA/SEAM/PMM's ``resnet38d.py``) are
converted, and the Flax features, logits and CAMs must match within 1e-4 relative.

torch is a test-only dependency (``pip install torch``); the tests skip without it.
"""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pmm_jax import convert, models
from pmm_jax.tools import weight_conversion

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

WIDTH_DIV = 16
BLOCKS = (1, 1, 2, 1)


# PyTorch ResNet38-d with the official module names (shared with bench/classifier_step.py).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.classifier_torch import TorchResNet38  # noqa: E402


def randomize_bn(module, seed=0):
    """Non-trivial BN statistics and affine parameters, so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return module.eval()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def nchw_to_nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def torch_resnet38():
    torch.manual_seed(0)
    return randomize_bn(TorchResNet38(WIDTH_DIV, BLOCKS, num_classes=5))


@pytest.fixture(scope="module")
def resnet38_ckpt(torch_resnet38, tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "resnet38_tiny.pth"
    state = {k: v for k, v in torch_resnet38.state_dict().items() if not k.startswith("fc8")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, src)
    out = tmp_path_factory.mktemp("ckpt") / "resnet38"
    convert.main(["--arch=resnet38", f"--src={src}", f"--out={out}"])
    return src, out


def test_resnet38_conversion_matches_torch(torch_resnet38, resnet38_ckpt):
    """Converted through the CLI and loaded with ``init_from``: features, CAMs and logits of the
    Flax classifier equal PyTorch's (float32, 1e-4 relative)."""
    _, out = resnet38_ckpt
    cfg = ml_collections.ConfigDict(dict(
        backbone=dict(name="resnet38", width_div=WIDTH_DIV, blocks=BLOCKS), dropout=0.5,
        init_from=str(out)))
    model = models.build_classifier(cfg, 5, models.init_rngs(1))
    models.load_pretrained(model.backbone, cfg.init_from, arch="resnet38")
    model.classifier.kernel[...] = jnp.asarray(weight_conversion.from_torch_layout(
        torch_resnet38.fc8.weight.detach().numpy()))
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 37, 45)).astype(np.float32)
    with torch.no_grad():
        t_feats, t_cam = torch_resnet38(torch.from_numpy(x))
    feats, out = nnx.jit(lambda m, x: (m.backbone(x), m(x)))(
        model, jnp.asarray(np.transpose(x, (0, 2, 3, 1))))
    assert len(feats) == len(t_feats) == 6
    for f, t in zip(feats, t_feats):
        assert f.shape == nchw_to_nhwc(t).shape
        assert rel_err(f, nchw_to_nhwc(t)) < 1e-4
    assert rel_err(out["cam"], nchw_to_nhwc(t_cam)) < 1e-4
    assert rel_err(out["logits"], t_cam.mean(dim=(2, 3)).numpy()) < 1e-4
    assert out["cam"].shape[1:3] == (math.ceil(37 / 8), math.ceil(45 / 8))


def test_missing_keys_are_listed(torch_resnet38, tmp_path):
    state = {k: v for k, v in torch_resnet38.state_dict().items() if not k.startswith("b7.")}
    src = tmp_path / "partial.pth"
    torch.save(state, src)
    with pytest.raises(ValueError, match=r"missing \(\d+\):\n    b7\.bn_branch2a\.bias"):
        weight_conversion.convert("resnet38", str(src), str(tmp_path / "out"))


def test_wrong_architecture_is_listed(tmp_path):
    """A torchvision-style ResNet state dict is not a ResNet38: missing and found keys listed."""
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
             "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    src = tmp_path / "resnet50.pth"
    torch.save(state, src)
    with pytest.raises(ValueError) as err:
        weight_conversion.convert("resnet38", str(src), str(tmp_path / "out"))
    message = str(err.value)
    assert "missing (" in message and "b2.bn_branch2a.bias" in message
    assert "unexpected (3)" in message and "layer1.0.conv1.weight" in message
    assert "is " in message and "a resnet38 checkpoint" in message


def test_load_pretrained_rejects_other_width_and_arch(resnet38_ckpt):
    _, out = resnet38_ckpt
    wider = nnx.eval_shape(lambda: models.ResNet38(width_div=8, blocks=BLOCKS,
                                                   rngs=models.init_rngs(0)))
    with pytest.raises(ValueError, match="shape mismatch"):
        models.load_pretrained(wider, str(out))
    tiny = models.ResNet38(width_div=WIDTH_DIV, blocks=BLOCKS, rngs=models.init_rngs(0))
    with pytest.raises(ValueError, match="holds a 'resnet38' checkpoint"):
        models.load_pretrained(tiny, str(out), arch="scalenet101")


def test_resnet38_parameter_count_equals_official():
    """The full network: same number of parameters as the official PyTorch module."""
    backbone = nnx.eval_shape(lambda: models.ResNet38(rngs=models.init_rngs(0)))
    with torch.device("meta"):
        official = TorchResNet38()
    n_torch = sum(p.numel() for p in official.parameters())
    assert models.count_params(backbone) == n_torch == 105_070_912
    assert backbone.out_channels[-1] == 4096 and backbone.out_strides[-1] == 8


def test_unreadable_pth_is_refused_without_suggesting_weights_only_false(tmp_path):
    """A pickle holding more than tensors (a whole pickled object): torch.load(weights_only=True)
    fails; the message names the file and says how to re-save, never to load unsafely."""
    src = tmp_path / "whole_model.pth"
    torch.save({"model": pathlib.PurePosixPath("not/a/tensor")}, src)
    with pytest.raises(ValueError) as err:
        weight_conversion.convert("resnet38", str(src), str(tmp_path / "out"))
    message = str(err.value)
    assert str(src) in message and "torch.save(model.state_dict(), PATH)" in message
    assert "weights_only=False" not in message
