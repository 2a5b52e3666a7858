"""PyTorch wide ResNet38-d, SEAM head and losses, written from the official PSA/SEAM/PMM code
(``network/resnet38d.py``, ``network/resnet38_SEAM.py``, ``train_SEAM.py``): the reference side
of ``bench/classifier_step.py`` and the oracle of ``tests/test_convert.py`` and
``tests/cams/test_seam.py``.

Module names are the official state-dict keys (``conv1a``, ``b2``, ``b2_1``, ..., ``bn7``,
``fc8``, ``f8_3``, ``f8_4``, ``f9``), NCHW. Only the benchmark and the tests import it (torch is
not a pmm_jax dependency).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class TorchResBlock(nn.Module):
    """Pre-activation basic block; ``forward`` returns ``(output, relu(bn(input)))``."""

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
    """Pre-activation bottleneck with Dropout2d after its two inner activations."""

    def __init__(self, cin, cout, dilation, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        act = F.relu(self.bn_branch2a(x))
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(act)))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return self.conv_branch1(act) + y, act


class TorchResNet38(nn.Module):
    """Official layout; ``forward`` returns the activated stage outputs (b2..b7, as the official
    ``forward_as_dict``: feature 2 = conv4, 3 = conv5, 5 = conv6) and fc8's CAM (None without
    ``num_classes``). ``div`` divides every width, ``blocks`` sets the depth of b2..b5."""

    frozen_prefixes = ("conv1a", "b2", "b2_1", "b2_2")  # the official ``not_training``

    def __init__(self, div=1, blocks=(3, 3, 6, 3), dilations=(2, 4, 2), num_classes=None,
                 dropout=(0.3, 0.5)):
        super().__init__()
        c = lambda n: max(1, n // div)  # noqa: E731
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
        self.b6 = TorchResBlockBot(cin, c(2048), dilations[1], dropout[0])
        self.b7 = TorchResBlockBot(c(2048), c(4096), dilations[2], dropout[1])
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.names += [["b6"], ["b7"]]
        self.out_channels = (c(128), c(256), c(512), c(1024), c(2048), c(4096))
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


# ---- SEAM: PCM and the losses of the official training loop ----------------------------------

def torch_pcm(cam, f, w9):
    """The official forward from ``cam = fc8(...)`` on: seeds (no gradient), f9, PCM (NCHW).

    ``cam`` has the C foreground channels; the official fc8's dead row 0 is added as zeros
    (its slot is overwritten by the background ``1 - max``). Returns ``[n, C+1, h, w]``.
    """
    n, c, h, w = cam.size()
    with torch.no_grad():
        cam_d = F.relu(cam.detach())
        cam_d_max = torch.max(cam_d.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1) + 1e-5
        norm = F.relu(cam_d - 1e-5) / cam_d_max
        norm = torch.cat([torch.zeros_like(norm[:, :1]), norm], 1)
        norm[:, 0] = 1 - torch.max(norm[:, 1:], dim=1)[0]
        cam_max = torch.max(norm[:, 1:], dim=1, keepdim=True)[0]
        norm[:, 1:][norm[:, 1:] < cam_max] = 0
    f = F.conv2d(f, w9).view(n, -1, h * w)
    f = f / (torch.norm(f, dim=1, keepdim=True) + 1e-5)
    aff = F.relu(torch.matmul(f.transpose(1, 2), f))
    aff = aff / (torch.sum(aff, dim=1, keepdim=True) + 1e-5)
    return torch.matmul(norm.view(n, c + 1, -1), aff).view(n, -1, h, w)


def torch_max_norm(p, e=1e-5):
    n, c = p.shape[:2]
    p = F.relu(p)
    max_v = torch.max(p.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
    min_v = torch.min(p.view(n, c, -1), dim=-1)[0].view(n, c, 1, 1)
    return F.relu(p - min_v - e) / (max_v - min_v + e)


def torch_min_pool(x):
    n, c, h, w = x.size()
    k = h * w // 4
    y = torch.topk(torch.max(x, dim=1)[0].view(n, -1), k=k, dim=-1, largest=False)[0]
    return torch.sum(F.relu(y)) / (k * n)


def torch_max_onehot(x):
    x_max = torch.max(x[:, 1:], dim=1, keepdim=True)[0]
    x[:, 1:][x[:, 1:] != x_max] = 0
    return x


def torch_losses(cam1, rv1, cam2, rv2, label_fg, size1, size2):
    """The official training-loop body from the two forwards on (fc8 row 0 added as zeros);
    the ECR targets are detached copies, as the official ``max_onehot(cam.detach())``."""
    up = lambda t, s: F.interpolate(t, s, mode="bilinear", align_corners=True)  # noqa: E731
    cam1 = up(torch.cat([torch.zeros_like(cam1[:, :1]), cam1], 1), size1)
    cam2 = up(torch.cat([torch.zeros_like(cam2[:, :1]), cam2], 1), size2)
    rv1, rv2 = up(rv1, size1), up(rv2, size2)
    n = label_fg.shape[0]
    label = torch.cat([torch.ones(n, 1, dtype=label_fg.dtype, device=label_fg.device),
                       label_fg], 1)[:, :, None, None]
    label1 = F.adaptive_avg_pool2d(cam1, (1, 1))
    rvmin1 = torch_min_pool((rv1 * label)[:, 1:])
    cam1 = up(torch_max_norm(cam1), size2) * label
    rv1 = up(torch_max_norm(rv1), size2) * label
    label2 = F.adaptive_avg_pool2d(cam2, (1, 1))
    rvmin2 = torch_min_pool((rv2 * label)[:, 1:])
    cam2 = torch_max_norm(cam2) * label
    rv2 = torch_max_norm(rv2) * label
    cls1 = F.multilabel_soft_margin_loss(label1[:, 1:, 0, 0], label[:, 1:, 0, 0])
    cls2 = F.multilabel_soft_margin_loss(label2[:, 1:, 0, 0], label[:, 1:, 0, 0])
    ns, cs, hs, ws = cam2.size()
    er = torch.mean(torch.abs(cam1[:, 1:] - cam2[:, 1:]))
    cam1[:, 0] = 1 - torch.max(cam1[:, 1:], dim=1)[0]
    cam2[:, 0] = 1 - torch.max(cam2[:, 1:], dim=1)[0]
    ecr1 = torch.abs(torch_max_onehot(cam2.detach().clone()) - rv1)
    ecr2 = torch.abs(torch_max_onehot(cam1.detach().clone()) - rv2)
    k = int(cs * hs * ws * 0.2)
    ecr = (torch.mean(torch.topk(ecr1.view(ns, -1), k=k, dim=-1)[0])
           + torch.mean(torch.topk(ecr2.view(ns, -1), k=k, dim=-1)[0]))
    cls = (cls1 + cls2) / 2
    rvmin = (rvmin1 + rvmin2) / 2
    return {"loss": cls + rvmin + er + ecr, "loss_cls": cls, "loss_rvmin": rvmin,
            "loss_er": er, "loss_ecr": ecr}


class TorchSEAM(nn.Module):
    """SEAM on ResNet38 (official ``resnet38_SEAM.Net``, fc8 without its dead row 0):
    ``forward(x) -> (cam [n,C,h,w], cam_rv [n,C+1,h,w])`` at the backbone's resolution (the
    losses resize both to the view's input size, as the official forward does)."""

    new_layers = ("fc8", "f8_3", "f8_4", "f9")

    def __init__(self, num_classes, div=1, blocks=(3, 3, 6, 3), dilations=(2, 4, 2),
                 dropout=0.5, pcm_widths=(64, 128)):
        super().__init__()
        self.backbone = TorchResNet38(div, blocks, dilations)
        ch = self.backbone.out_channels
        self.dropout7 = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(ch[-1], num_classes, 1, bias=False)
        self.f8_3 = nn.Conv2d(ch[2], pcm_widths[0], 1, bias=False)
        self.f8_4 = nn.Conv2d(ch[3], pcm_widths[1], 1, bias=False)
        self.f9 = nn.Conv2d(sum(pcm_widths) + 3, sum(pcm_widths), 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    def forward(self, x):
        feats, _ = self.backbone(x)
        cam = self.fc8(self.dropout7(feats[-1]))
        h, w = cam.shape[2:]
        f = torch.cat([F.interpolate(x, (h, w), mode="bilinear", align_corners=True),
                       F.relu(self.f8_3(feats[2].detach())),
                       F.relu(self.f8_4(feats[3].detach()))], 1)
        return cam, torch_pcm(cam, f, self.f9.weight)


def seam_loss(model, image, labels):
    """Both views (the image and its 0.3x bilinear ``align_corners=True`` copy) through
    ``model``, then :func:`torch_losses`; returns the loss dict."""
    size1 = tuple(image.shape[2:])
    size2 = tuple(int(math.floor(s * 0.3)) for s in size1)
    image2 = F.interpolate(image, size2, mode="bilinear", align_corners=True)
    cam1, rv1 = model(image)
    cam2, rv2 = model(image2)
    return torch_losses(cam1, rv1, cam2, rv2, labels, size1, size2)


class TorchCAMClassifier(nn.Module):
    """Plain CAM classifier: ResNet38 -> Dropout2d -> fc8 (no bias); ``forward`` returns the
    GAP logits ``[n, C]``."""

    new_layers = ("fc8",)

    def __init__(self, num_classes, div=1, blocks=(3, 3, 6, 3), dilations=(2, 4, 2),
                 dropout=0.5):
        super().__init__()
        self.backbone = TorchResNet38(div, blocks, dilations)
        self.dropout7 = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(self.backbone.out_channels[-1], num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

    def forward(self, x):
        feats, _ = self.backbone(x)
        return self.fc8(self.dropout7(feats[-1])).mean(dim=(2, 3))


def train_mode(model):
    """``model.train()`` with every BatchNorm in inference mode (running statistics), as the
    official networks' ``train()`` override does."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def seam_param_groups(model, lr, weight_decay):
    """The official ``get_parameter_groups`` + ``not_training``: conv1a, b2* and every BN
    frozen (``requires_grad = False``); backbone conv weights (lr, decay) and biases (2x lr),
    new-layer weights (10x lr, decay) and biases (20x lr). Empty groups are left out."""
    groups = [([], 1.0, weight_decay), ([], 2.0, 0.0), ([], 10.0, weight_decay), ([], 20.0, 0.0)]
    for name, m in model.named_modules():
        path = name.split(".")
        frozen_block = path[0] == "backbone" and len(path) > 1 and (
            path[1] in TorchResNet38.frozen_prefixes)
        if isinstance(m, nn.BatchNorm2d) or frozen_block:
            for p in m.parameters(recurse=False):
                p.requires_grad = False
            continue
        if isinstance(m, nn.Conv2d):
            new = path[0] in model.new_layers
            groups[2 if new else 0][0].append(m.weight)
            if m.bias is not None:
                groups[3 if new else 1][0].append(m.bias)
    return [{"params": params, "lr": lr * mult, "mult": mult, "weight_decay": decay}
            for params, mult, decay in groups if params]
