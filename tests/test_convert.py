"""pmm_jax.convert against PyTorch: randomly initialised PyTorch networks laid out like the
official ones (module names = state-dict keys of PSA/SEAM/PMM's ``resnet38d.py``) are
converted, and the Flax features, logits and CAMs must match within 1e-4 relative.

torch is a test-only dependency (``pip install torch``); the tests skip without it.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pmm_jax import convert, models

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

WIDTH_DIV = 16
BLOCKS = (1, 1, 2, 1)


# ---- PyTorch ResNet38-d with the official module names (written for this test) -------------

class TorchResBlock(nn.Module):
    def __init__(self, cin, mid, cout, stride=1, first_dilation=1, dilation=1):
        super().__init__()
        self.same_shape = cin == cout and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        act = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(act)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(act))))
        return shortcut + y, act


class TorchResBlockBot(nn.Module):
    def __init__(self, cin, cout, dilation):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        act = F.relu(self.bn_branch2a(x))
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(act))))
        y = self.conv_branch2b2(F.relu(self.bn_branch2b2(y)))
        return self.conv_branch1(act) + y, act


class TorchResNet38(nn.Module):
    """Official layout; ``forward`` returns the activated stage outputs and fc8's CAM."""

    def __init__(self, div=1, blocks=(3, 3, 6, 3), dilations=(2, 4, 2), num_classes=None):
        super().__init__()
        c = lambda n: n // div
        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        cin, self.names = c(64), []
        specs = ((2, 128, 128, 2, 1, 1), (3, 256, 256, 2, 1, 1), (4, 512, 512, 2, 1, 1),
                 (5, 512, 1024, 1, 1, dilations[0]))
        for (stage, mid, out, stride, first, dil), depth in zip(specs, blocks):
            names = [f"b{stage}"] + [f"b{stage}_{i}" for i in range(1, depth)]
            for i, name in enumerate(names):
                setattr(self, name, TorchResBlock(cin, c(mid), c(out), stride if i == 0 else 1,
                                                  first if i == 0 else dil, dil))
                cin = c(out)
            self.names.append(names)
        self.b6 = TorchResBlockBot(cin, c(2048), dilations[1])
        self.b7 = TorchResBlockBot(c(2048), c(4096), dilations[2])
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.names += [["b6"], ["b7"]]
        if num_classes:
            self.fc8 = nn.Conv2d(c(4096), num_classes, 1, bias=False)

    def forward(self, x):
        x, feats = self.conv1a(x), []
        for k, names in enumerate(self.names):
            for i, name in enumerate(names):
                x, act = getattr(self, name)(x)
                if i == 0 and k > 0:
                    feats.append(act)
        feats.append(F.relu(self.bn7(x)))
        return feats, (self.fc8(feats[-1]) if hasattr(self, "fc8") else None)


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
    model.classifier.kernel[...] = jnp.asarray(convert.from_torch_layout(
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
        convert.convert("resnet38", str(src), str(tmp_path / "out"))


def test_wrong_architecture_is_listed(tmp_path):
    """A torchvision-style ResNet state dict is not a ResNet38: missing and found keys listed."""
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
             "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    src = tmp_path / "resnet50.pth"
    torch.save(state, src)
    with pytest.raises(ValueError) as err:
        convert.convert("resnet38", str(src), str(tmp_path / "out"))
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
