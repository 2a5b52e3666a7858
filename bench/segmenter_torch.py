"""PyTorch PSPNet on mmseg's ResNetV1c: the reference side of ``bench/segmenter_step.py``.

Same layout as ``pmm_jax.models.resnet_v1c`` + ``pmm_jax.models.pspnet`` (mmseg's
``ResNetV1c``, ``PSPHead`` and ``FCNHead``); outputs are upsampled to the input size, where
the loss is taken. Only the benchmark imports it (torch is not a pmm_jax dependency).
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin, cout, k, stride=1, dilation=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, dilation):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(cin, planes, 1),
                                  conv_bn_relu(planes, planes, 3, stride, dilation),
                                  conv_bn_relu(planes, planes * 4, 1, relu=False))
        self.downsample = (conv_bn_relu(cin, planes * 4, 1, stride, relu=False)
                           if stride != 1 or cin != planes * 4 else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.body(x) + identity)


class ResNetV1c(nn.Module):
    def __init__(self, blocks, base_width, stem_width, strides=(1, 2, 1, 1),
                 dilations=(1, 1, 2, 4)):
        super().__init__()
        half = stem_width // 2
        self.stem = nn.Sequential(conv_bn_relu(3, half, 3, 2), conv_bn_relu(half, half, 3),
                                  conv_bn_relu(half, stem_width, 3), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem_width
        for i, (n, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            planes = base_width * 2 ** i
            first = dilation // 2 if dilation > 1 else dilation
            layer = [Bottleneck(cin, planes, stride, first)]
            cin = planes * 4
            layer += [Bottleneck(cin, planes, 1, dilation) for _ in range(n - 1)]
            layers.append(nn.Sequential(*layer))
        self.layers = nn.ModuleList(layers)
        self.out_channels = [base_width * 2 ** i * 4 for i in range(4)]

    def forward(self, x):
        x, features = self.stem(x), []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class TorchPSPNet(nn.Module):
    def __init__(self, blocks, base_width, stem_width, channels, aux_channels, num_classes,
                 bins=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.backbone = ResNetV1c(blocks, base_width, stem_width)
        cin, aux_in = self.backbone.out_channels[-1], self.backbone.out_channels[-2]
        self.bins = bins
        self.ppm = nn.ModuleList([conv_bn_relu(cin, channels, 1) for _ in bins])
        self.bottleneck = conv_bn_relu(cin + len(bins) * channels, channels, 3)
        self.cls = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux = nn.Sequential(conv_bn_relu(aux_in, aux_channels, 3), nn.Dropout2d(dropout),
                                 nn.Conv2d(aux_channels, num_classes, 1))

    def forward(self, x):
        size = x.shape[2:]
        features = self.backbone(x)
        top = features[-1]
        pooled = [F.interpolate(conv(F.adaptive_avg_pool2d(top, n)), top.shape[2:],
                                mode="bilinear", align_corners=False)
                  for n, conv in zip(self.bins, self.ppm)]
        logits = self.cls(self.bottleneck(torch.cat([top, *pooled], 1)))
        aux = self.aux(features[-2])
        up = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=False)  # noqa: E731
        return up(logits), up(aux)
