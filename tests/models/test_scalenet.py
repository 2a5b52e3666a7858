"""ScaleNet: a PyTorch mirror with PMM's module layout (written for this test) is converted with
``python -m pmm_jax.convert --arch=scalenet101`` and must give the same stage features
(float32, 1e-4 relative); a structure json that does not fit the weights is a listed error.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax import convert, models
from pmm_jax.tools import weight_conversion

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

WIDTH_DIV = 16
LAYERS = (1, 1, 1, 1)
# [c1, c2, c4, c7, side]: a zero-width branch, and side 7 gives 1x1 convs at scales 4 and 7.
TINY_STRUCTURE = [[4, 3, 2, 0, 56], [6, 3, 2, 1, 28], [8, 4, 3, 2, 14], [10, 6, 2, 1, 7]]


class TorchSABlock(nn.Module):
    def __init__(self, cin, planes, entry, stride, dilation):
        super().__init__()
        widths, side = entry[:-1], entry[-1]
        self.stride, self.scales = stride, [None, 2, 4, 7]
        out = planes * 4
        self.downsample = (nn.Sequential(nn.Conv2d(cin, out, 1, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or cin != out else None)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        big = [side / 2 ** i > 1 for i in range(4)]
        self.conv2 = nn.ModuleList([
            nn.Conv2d(planes, c, 3 if big[i] else 1, padding=dilation if big[i] else 0,
                      dilation=dilation if big[i] else 1, bias=False) if c > 0 else None
            for i, c in enumerate(widths)])
        self.bn2 = nn.ModuleList([nn.BatchNorm2d(c) if c > 0 else None for c in widths])
        self.conv3 = nn.Conv2d(sum(widths), out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)

    def forward(self, x):
        x = F.max_pool2d(x, self.stride, self.stride) if self.stride > 1 else x
        residual = self.downsample(x) if self.downsample is not None else x
        out1 = F.relu(self.bn1(self.conv1(x)))
        size, outs = out1.shape[2:], []
        for scale, conv2, bn2 in zip(self.scales, self.conv2, self.bn2):
            if conv2 is None:
                continue
            y = out1
            if scale is not None:
                if y.shape[3] < scale or y.shape[2] < scale:
                    y = F.max_pool2d(y, y.shape[2], y.shape[3])
                else:
                    y = F.max_pool2d(y, scale, scale)
            y = conv2(y)
            if scale is not None:
                divides = size[0] % y.shape[2] == 0 and size[1] % y.shape[3] == 0
                y = F.interpolate(y, size=tuple(size), mode="nearest" if divides else "bilinear")
            outs.append(bn2(y))
        return F.relu(self.bn3(self.conv3(F.relu(torch.cat(outs, 1)))) + residual)


class TorchScaleNet(nn.Module):
    def __init__(self, structure, layers, div, dilations=(1, 1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64 // div, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64 // div)
        cin, entries = 64 // div, iter(structure)
        for k, (depth, stride) in enumerate(zip(layers, (1, 2, 1, 1))):
            planes = 64 * 2 ** k // div
            blocks = []
            for i in range(depth):
                blocks.append(TorchSABlock(cin, planes, next(entries), stride if i == 0 else 1,
                                           dilations[k]))
                cin = planes * 4
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        feats = []
        for k in range(1, 5):
            x = getattr(self, f"layer{k}")(x)
            feats.append(x)
        return feats


def randomize_bn(module):
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return module.eval()


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / (np.max(np.abs(b)) + 1e-12))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    net = randomize_bn(TorchScaleNet(TINY_STRUCTURE, LAYERS, WIDTH_DIV, dilations=(1, 1, 2, 2)))
    root = tmp_path_factory.mktemp("scalenet")
    structure = root / "tiny.json"
    structure.write_text(json.dumps(TINY_STRUCTURE))
    torch.save(net.state_dict(), root / "tiny.pth")
    convert.main(["--arch=scalenet101", f"--src={root / 'tiny.pth'}",
                  f"--structure={structure}", f"--out={root / 'ckpt'}"])
    return net, root


@pytest.mark.parametrize("size", [(45, 61)])
def test_scalenet_conversion_matches_torch(converted, size):
    net, root = converted
    # Shape-only build: the checkpoint supplies every variable (ScaleNet has no RNG state), so
    # nothing is randomly initialised (and nothing compiled for it).
    backbone = nnx.eval_shape(lambda: models.build_backbone(
        dict(name="scalenet101", structure=str(root / "tiny.json"), layers=LAYERS,
             width_div=WIDTH_DIV, dilations=(1, 1, 2, 2)), models.init_rngs(0)))
    models.load_pretrained(backbone, str(root / "ckpt"), arch="scalenet101")
    x = np.random.default_rng(0).normal(size=(2, 3, *size)).astype(np.float32)
    with torch.no_grad():
        expected = [np.transpose(t.numpy(), (0, 2, 3, 1)) for t in net(torch.from_numpy(x))]
    feats = nnx.jit(lambda m, x: m(x))(backbone, jnp.asarray(np.transpose(x, (0, 2, 3, 1))))
    assert backbone.out_strides == (4, 8, 8, 8)
    for f, e in zip(feats, expected):
        assert f.shape == e.shape
        assert rel_err(f, e) < 1e-4


def test_structure_that_does_not_fit_is_listed(converted, tmp_path):
    _, root = converted
    wrong = [list(e) for e in TINY_STRUCTURE]
    wrong[0][3] = 2  # a branch the checkpoint does not have
    wrong[1][0] = 7  # a width that differs
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError) as err:
        weight_conversion.convert("scalenet101", str(root / "tiny.pth"), str(tmp_path / "out"),
                        structure=str(tmp_path / "wrong.json"))
    message = str(err.value)
    assert "missing" in message and "layer1.0.conv2.3.weight" in message
    assert "shape mismatch" in message and "layer2.0.conv2.0.weight" in message
    assert "does --structure=" in message


def test_scalenet101_needs_a_structure(converted):
    _, root = converted
    with pytest.raises(ValueError, match="needs --structure"):
        weight_conversion.convert("scalenet101", str(root / "tiny.pth"), "/nonexistent")
