"""Weight import of the segmentation backbones (ResNetV1c / torchvision ResNet, Res2Net-v1b).

PyTorch is a test-only oracle: the tests build small randomly initialised PyTorch networks
with the official module names (mmseg ResNetV1c, torchvision ResNet, official/timm Res2Net
v1b), save their state dicts, convert them with ``python -m pmm_jax.convert`` and require
the same stage features in float32 (1e-4 relative).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tnn = torch.nn

from pmm_jax import (
    convert,
    models,  # noqa: E402
)
from pmm_jax.models import pretrained  # noqa: E402

BLOCKS = (2, 1, 2, 1)
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)


class TorchBottleneck(tnn.Module):
    """mmseg / torchvision bottleneck, stride on the 3x3 conv."""

    def __init__(self, inplanes, planes, stride, dilation):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                                bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), tnn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    """mmseg ResNetV1c (deep stem, contract_dilation) or torchvision ResNet (7x7 stem)."""

    def __init__(self, base, stem_width, deep_stem):
        super().__init__()
        half = stem_width // 2
        if deep_stem:
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, half, 3, 2, 1, bias=False), tnn.BatchNorm2d(half), tnn.ReLU(),
                tnn.Conv2d(half, half, 3, 1, 1, bias=False), tnn.BatchNorm2d(half), tnn.ReLU(),
                tnn.Conv2d(half, stem_width, 3, 1, 1, bias=False), tnn.BatchNorm2d(stem_width),
                tnn.ReLU())
        else:
            self.stem = None
            self.conv1 = tnn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(stem_width)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = stem_width
        for i, (n, stride, dilation) in enumerate(zip(BLOCKS, STRIDES, DILATIONS)):
            planes = base * 2 ** i
            first = dilation // 2 if dilation > 1 else dilation
            layer = [TorchBottleneck(inplanes, planes, stride, first)]
            inplanes = planes * 4
            layer += [TorchBottleneck(inplanes, planes, 1, dilation) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", tnn.Sequential(*layer))
        self.fc = tnn.Linear(inplanes, 10)  # ImageNet head: ignored by the converter

    def forward(self, x):
        x = self.stem(x) if self.stem is not None else torch.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class TorchBottle2neck(tnn.Module):
    """The official Res2Net v1b Bottle2neck (as in WSSS_MMSeg), written out for the test."""

    def __init__(self, inplanes, planes, stride, dilation, first, base_width, scale):
        super().__init__()
        width = int(math.floor(planes * base_width / 64.0))
        self.width, self.first, self.nums = width, first, scale - 1
        self.conv1 = tnn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width * scale)
        self.pool = tnn.AvgPool2d(3, stride, 1) if first else None
        self.convs = tnn.ModuleList([tnn.Conv2d(width, width, 3, stride, padding=dilation,
                                                dilation=dilation, bias=False)
                                     for _ in range(self.nums)])
        self.bns = tnn.ModuleList([tnn.BatchNorm2d(width) for _ in range(self.nums)])
        self.conv3 = tnn.Conv2d(width * scale, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = tnn.Sequential(
                tnn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                tnn.Conv2d(inplanes, planes * 4, 1, bias=False), tnn.BatchNorm2d(planes * 4))

    def forward(self, x):
        spx = torch.split(torch.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs = []
        for i in range(self.nums):
            sp = spx[i] if i == 0 or self.first else outs[-1] + spx[i]
            outs.append(torch.relu(self.bns[i](self.convs[i](sp))))
        outs.append(self.pool(spx[self.nums]) if self.first else spx[self.nums])
        out = self.bn3(self.conv3(torch.cat(outs, 1)))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchRes2Net(tnn.Module):
    def __init__(self, planes, stem_width, base_width, scale, blocks=BLOCKS):
        super().__init__()
        half = stem_width // 2
        self.conv1 = tnn.Sequential(
            tnn.Conv2d(3, half, 3, 2, 1, bias=False), tnn.BatchNorm2d(half), tnn.ReLU(),
            tnn.Conv2d(half, half, 3, 1, 1, bias=False), tnn.BatchNorm2d(half), tnn.ReLU(),
            tnn.Conv2d(half, stem_width, 3, 1, 1, bias=False))
        self.bn1 = tnn.BatchNorm2d(stem_width)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = stem_width
        for i, (n, stride, dilation) in enumerate(zip(blocks, STRIDES, DILATIONS)):
            p = planes[i]
            layer = [TorchBottle2neck(inplanes, p, stride, dilation, True, base_width, scale)]
            inplanes = p * 4
            layer += [TorchBottle2neck(inplanes, p, 1, dilation, False, base_width, scale)
                      for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", tnn.Sequential(*layer))
        self.fc = tnn.Linear(inplanes, 10)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


def _randomise_bn(net):
    """Non-trivial BN statistics and affine parameters, so a mis-mapped one shows."""
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, tnn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return net.eval()


def _abstract(name, **kwargs):
    """Shape-only backbone (fast to build); loading the converted weights makes it concrete."""
    return nnx.eval_shape(lambda: models.BACKBONES[name](**kwargs, rngs=nnx.Rngs(0)))


def _convert_and_load(tmp_path, arch, net, ours):
    src, out = tmp_path / "net.pth", tmp_path / "ckpt"
    torch.save(net.state_dict(), src)
    convert.main([f"--arch={arch}", f"--src={src}", f"--out={out}"])
    pretrained.load_pretrained(ours, str(out), arch=arch)
    ours.eval()
    return ours


def _assert_same_features(net, ours, shape=(2, 3, 45, 51)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = [t.permute(0, 2, 3, 1).numpy() for t in net(x)]
    got = nnx.jit(lambda model, image: model(image))(ours, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    assert len(got) == 4
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-4 * np.abs(e).max())


@pytest.mark.parametrize("deep_stem", [True, False])
def test_resnet101_import_matches_torch(tmp_path, deep_stem):
    torch.manual_seed(0)
    net = _randomise_bn(TorchResNet(base=4, stem_width=8, deep_stem=deep_stem))
    ours = _abstract("resnet101", blocks=BLOCKS, base_width=4, stem_width=8, deep_stem=deep_stem)
    _assert_same_features(net, _convert_and_load(tmp_path, "resnet101", net, ours))


def test_res2net101_import_matches_torch(tmp_path):
    torch.manual_seed(0)
    planes = (8, 16, 16, 24)
    net = _randomise_bn(TorchRes2Net(planes, stem_width=8, base_width=26, scale=4))
    ours = _abstract("res2net101", blocks=BLOCKS, planes=planes, stem_width=8)
    _assert_same_features(net, _convert_and_load(tmp_path, "res2net101", net, ours))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    """The command exits 1 with one ``error:`` paragraph listing what does not fit."""
    net = TorchResNet(base=4, stem_width=8, deep_stem=True)
    state = net.state_dict()
    state["layer1.0.conv2.weight"] = torch.zeros(4, 4, 1, 1)
    del state["layer2.0.bn1.running_var"]
    torch.save(state, tmp_path / "bad.pth")
    assert convert.main(["--arch=resnet101", f"--src={tmp_path / 'bad.pth'}",
                         f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(r"missing.*layer2\.0\.bn1\.running_var.*shape mismatch.*"
                     r"layer1\.0\.conv2\.weight", err), err
    torch.save(net.state_dict(), tmp_path / "resnet.pth")
    assert convert.main(["--arch=res2net101", f"--src={tmp_path / 'resnet.pth'}",
                         f"--out={tmp_path / 'out'}"]) == 1
    assert "not a Res2Net" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", [
    dict(name="resnet101", blocks=(1, 1, 2, 1), base_width=4, stem_width=8),
    dict(name="res2net101", blocks=(1, 1, 2, 1), planes=(4, 8, 8, 16), stem_width=8)])
def test_segmentation_backbones_build_by_name_and_run_in_pspnet(backbone):
    """Shapes only (abstract evaluation): stride 8 logits from the last stage, aux head on
    layer3 (the numerics are pinned by the import tests above)."""
    cfg = dict(backbone=backbone, channels=8, aux_channels=4)
    model = nnx.eval_shape(lambda: models.build_segmenter(cfg, 21, nnx.Rngs(0)))
    assert model.backbone.out_strides == (4, 8, 8, 8)
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 65, 63, 3), jnp.float32))
    assert out["logits"].shape == (2, 9, 8, 21) and out["aux_logits"].shape == (2, 9, 8, 21)
