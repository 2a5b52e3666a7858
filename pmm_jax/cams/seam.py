"""SEAM (Wang et al., CVPR 2020) as PMM trains its CAM classifier: model, losses, optimiser.

Definitions follow the official code (YudeWang/SEAM ``network/resnet38_SEAM.py`` and
``train_SEAM.py``; Eli-YiLi/PMM ``network/scalenet_SEAM.py`` and ``pipeline/train_cam.py``),
re-derived here, NHWC.

Model (:class:`SEAM`): the backbone's last feature -> Dropout2d -> 1x1 conv (no bias) gives the
raw CAM ``[B,h,w,C]`` (C foreground classes). The PCM (pixel correlation module) refines it:

* seeds (no gradient): ``relu(cam)`` is max-normalised per class,
  ``relu(cam - 1e-5) / (max + 1e-5)``; background = ``1 - max_c``; every foreground value
  below the per-pixel foreground maximum is zeroed. Channels ``[bg, fg_1..fg_C]``.
* features (backbone gradient stopped): ``relu(1x1 conv)`` of two intermediate features to 64
  and 128 channels (SEAM: ResNet38's b4 and b5 outputs ``conv4``/``conv5``; PMM's ScaleNet:
  layer2 and layer3), concatenated with the input image resized to the CAM size (bilinear,
  ``align_corners=True``), then a 1x1 conv (195 -> 192, no bias) ``f9``.
* ``f`` normalised to unit length per pixel (``f / (|f| + 1e-5)``); affinity
  ``A = relu(f^T f)`` ``[hw, hw]``, each column divided by its sum (+1e-5); the refined CAM is
  ``cam_rv[:, j] = sum_i seeds[:, i] A[i, j]`` (C+1 channels, background first, >= 0).

The official fc8 has a 21st output (row 0, "background") that receives no gradient and is
never read (its slot is overwritten by ``1 - max`` everywhere); it is left out here, so the
head has C outputs. PMM's ScaleNet variant has no dropout before the head (``dropout=0``).

Losses (:func:`seam_loss`), with view 1 = the image and view 2 = the image resized by 0.3
(bilinear, ``align_corners=True``, size ``floor(0.3 * side)``); both views' CAMs and refined
CAMs are first resized to their view's input size (``align_corners=True``, as the official
forward does):

* classification: multilabel soft-margin of GAP(cam) against the labels, mean of the views;
* ``rvmin`` (official, not in the paper; "changes the optimal background score"): for each
  view, the mean of relu of the smallest quarter of ``max_c (cam_rv * label)[fg]``; mean of the
  views, added to the classification loss;
* equivariant regularisation ``er = mean |N(cam1)↓0.3 * y - N(cam2) * y|`` over the foreground
  channels, where ``N`` is SEAM's ``max_norm`` (``relu``, then ``relu(p - min - 1e-5) /
  (max - min + 1e-5)`` per class) and ``↓0.3`` the resize of view 1 to view 2's size;
* ECR: with ``b = 1 - max_c`` over the (normalised, label-masked) foreground and
  ``H(x)`` = SEAM's ``max_onehot`` (foreground values other than the per-pixel foreground
  maximum set to 0, the background channel kept as is; no gradient),
  ``ecr = topk20(|H([b, cam2]) - N(cam_rv1)↓0.3 * y|) + topk20(|H([b, cam1↓0.3]) - N(cam_rv2) * y|)``
  where ``topk20`` is the mean of the largest ``int(0.2 * (C+1) * h2 * w2)`` entries per image,
  then over the batch; ``y`` includes background = 1.
* total = cls + rvmin + er + ecr (unweighted, as official). The official loop's
  ``torch.clamp(loss, 0, 2)`` discards its result and is therefore not reproduced; nor is its
  skipping of NaN losses.

Optimiser (:func:`make_optimizer`): SGD, poly decay, four groups by parameter path, exactly the
official ``get_parameter_groups``: backbone conv weights (lr, weight decay), backbone conv
biases (2x lr, no decay), new-layer (head, PCM) weights (10x lr, decay), new-layer biases
(20x lr, no decay). Never updated: the backbone's ``frozen_prefixes`` (ResNet38: conv1a, b2;
ScaleNet: conv1, bn1, layer1) and every BatchNorm scale/offset (the official code freezes all
BN). The official ``PolyOptimizer`` passes weight decay into SGD's momentum slot, so its
momentum is 5e-4; ``official_momentum=True`` reproduces that, the default is 0.9.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pmm_jax.models.cam_classifier import multilabel_soft_margin_loss
from pmm_jax.models.backbone import FrozenBatchNorm
from pmm_jax.models.resnet38 import ResNet38
from pmm_jax.models.scalenet import ScaleNet

VIEW_SCALE = 0.3
ECR_TOP = 0.2
EPS = 1e-5

# Parameter-group labels of make_optimizer: (lr multiplier, weight decay applies).
GROUPS = {"backbone_weight": (1.0, True), "backbone_bias": (2.0, False),
          "new_weight": (10.0, True), "new_bias": (20.0, False)}
FROZEN = "frozen"
# Model-config fields of a SEAM classifier besides ``backbone`` (and ``init_from``).
SEAM_OPTIONS = ("dropout", "pcm_features", "pcm_widths")


def default_pcm_features(backbone: nnx.Module) -> tuple[int, int]:
    """Indices into the backbone's feature list that feed the PCM: ResNet38's b4/b5 outputs
    (SEAM's conv4/conv5), ScaleNet's layer2/layer3 (PMM), else the two stages before the last
    (any other backbone, e.g. the demo's small ResNet)."""
    if isinstance(backbone, ResNet38):
        return 2, 3
    if isinstance(backbone, ScaleNet):
        return 1, 2
    n = len(backbone.out_channels)
    return n - 3, n - 2


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size`` with torch's ``align_corners=True``
    (corner pixels map onto corner pixels; a side of 1 samples index 0)."""
    def matrix(n_in: int, n_out: int) -> np.ndarray:
        pos = (np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1
               else np.zeros(1))
        lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = pos - lo
        m = np.zeros((n_out, n_in), np.float32)
        np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
        np.add.at(m, (np.arange(n_out), hi), frac)
        return m

    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(matrix(h, size[0]), x.dtype)
    mw = jnp.asarray(matrix(w, size[1]), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw)


def pcm_seeds(cam: jax.Array) -> jax.Array:
    """The PCM's input from a raw CAM ``[B,h,w,C]``: ``[B,h,w,C+1]``, background first (see the
    module docstring); gradient stopped."""
    cam = jax.nn.relu(jax.lax.stop_gradient(cam))
    peak = jnp.max(cam, axis=(1, 2), keepdims=True) + EPS
    norm = jax.nn.relu(cam - EPS) / peak
    fg_max = jnp.max(norm, axis=-1, keepdims=True)
    return jnp.concatenate([1.0 - fg_max, jnp.where(norm < fg_max, 0.0, norm)], axis=-1)


def norm_with_zero_gradient(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis (kept) with ``torch.norm``'s gradient: 0 at a zero
    vector, where ``jnp.linalg.norm``'s is NaN. The PCM's per-pixel features are exactly zero
    in a crop's zero padding (VOC's 375-pixel sides in a 448 crop)."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    nonzero = squared > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1.0)), 0.0)


# The PCM's affinity is [hw, hw] per image: 1 GiB in float32 for the 128 x 128 CAM of a
# 1024 px input (a 512 px image at scale 2), 38 MiB for a 448 px crop, times the batch (a
# multi-crop CAM step runs 2 x tile_batch crops). It is computed at most PCM_BLOCK columns at
# a time.
PCM_BLOCK = 1024


def pcm(seeds: jax.Array, features: jax.Array) -> jax.Array:
    """Refines ``seeds[B,h,w,K]`` with the affinity of ``features[B,h,w,D]`` (same h, w).

    Column j of the affinity (normalised over its own column) gives output position j alone,
    so maps of more than :data:`PCM_BLOCK` positions are done in equal blocks of at most that
    many columns (``lax.map``) with the same arithmetic per column (the same values as the
    whole matrix at once): peak memory ``hw x PCM_BLOCK`` per image instead of ``hw x hw``.
    """
    b, h, w, k = seeds.shape
    n = h * w
    f = features.reshape(b, n, -1)
    f = f / (norm_with_zero_gradient(f) + EPS)
    s = seeds.reshape(b, n, k)

    def columns(f_cols: jax.Array) -> jax.Array:
        aff = jax.nn.relu(jnp.einsum("bid,bjd->bij", f, f_cols))
        aff = aff / (jnp.sum(aff, axis=1, keepdims=True) + EPS)
        return jnp.einsum("bij,bik->bjk", aff, s)

    if n <= PCM_BLOCK:
        return columns(f).reshape(b, h, w, k)
    blocks = -(-n // PCM_BLOCK)
    width = -(-n // blocks)
    # Padding columns are zero features: zero affinity, zero output, cut off below.
    f_cols = jnp.pad(f, ((0, 0), (0, blocks * width - n), (0, 0)))
    f_cols = f_cols.reshape(b, blocks, width, -1).swapaxes(0, 1)
    out = jax.lax.map(columns, f_cols)  # [blocks, B, width, K]
    return out.swapaxes(0, 1).reshape(b, blocks * width, k)[:, :n].reshape(b, h, w, k)


class SEAM(nnx.Module):
    """CAM head + PCM on a backbone (protocol of ``pmm_jax.models``); see the module docstring.

    Args:
      backbone: returns per-stage features; its last one feeds the CAM head.
      num_foreground: foreground classes C.
      dropout: Dropout2d rate before the head (SEAM/ResNet38 0.5, PMM/ScaleNet 0).
      pcm_features: feature indices for the PCM's two 1x1 convs (default
        :func:`default_pcm_features`); resized to the CAM size when their stride differs.
      pcm_widths: output channels of those convs (official 64, 128).

    ``new_layers`` names the attributes trained from scratch (the 10x/20x lr groups). Under a
    bfloat16 compute dtype (``pmm_jax.training.precision``) the CAM head stays float32
    (``float32_layers``) and the PCM's features are cast to float32 before the PCM.
    """

    new_layers = ("classifier", "f8_3", "f8_4", "f9")
    float32_layers = ("classifier",)

    def __init__(self, backbone: nnx.Module, num_foreground: int, dropout: float = 0.5,
                 pcm_features: Sequence[int] | None = None, pcm_widths: Sequence[int] = (64, 128),
                 *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.pcm_features = tuple(pcm_features or default_pcm_features(backbone))
        ch = backbone.out_channels
        kaiming = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
        self.classifier = nnx.Conv(ch[-1], num_foreground, (1, 1), use_bias=False,
                                   kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        self.f8_3 = nnx.Conv(ch[self.pcm_features[0]], pcm_widths[0], (1, 1), use_bias=False,
                             kernel_init=kaiming, rngs=rngs)
        self.f8_4 = nnx.Conv(ch[self.pcm_features[1]], pcm_widths[1], (1, 1), use_bias=False,
                             kernel_init=kaiming, rngs=rngs)
        width = sum(pcm_widths)
        self.f9 = nnx.Conv(width + 3, width, (1, 1), use_bias=False,
                           kernel_init=nnx.initializers.variance_scaling(16.0, "fan_avg",
                                                                         "uniform"),
                           rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
        """``x[B,H,W,3]`` -> ``{"cam": [B,h,w,C] raw, "logits": [B,C] = GAP(cam),
        "cam_rv": [B,h,w,C+1] refined, background first}`` at the backbone's output stride."""
        features = self.backbone(x)
        cam = self.classifier(self.dropout(features[-1], rngs=rngs))
        size = cam.shape[1:3]

        def side(index: int, layer: nnx.Conv) -> jax.Array:
            f = jax.lax.stop_gradient(features[index])
            if f.shape[1:3] != size:
                f = resize_align_corners(f, size)
            return jax.nn.relu(layer(f))

        f = jnp.concatenate([resize_align_corners(x, size), side(self.pcm_features[0], self.f8_3),
                             side(self.pcm_features[1], self.f8_4)], axis=-1)
        cam_rv = pcm(pcm_seeds(cam), self.f9(f).astype(jnp.float32))
        return {"cam": cam, "logits": jnp.mean(cam, axis=(1, 2)), "cam_rv": cam_rv}


def max_norm(p: jax.Array) -> jax.Array:
    """SEAM's ``max_norm`` per image and channel of NHWC ``p``: ``relu``, then
    ``relu(p - min - 1e-5) / (max - min + 1e-5)``."""
    p = jax.nn.relu(p)
    hi = jnp.max(p, axis=(1, 2), keepdims=True)
    lo = jnp.min(p, axis=(1, 2), keepdims=True)
    return jax.nn.relu(p - lo - EPS) / (hi - lo + EPS)


def max_onehot(x: jax.Array) -> jax.Array:
    """SEAM's ``max_onehot`` on ``[..., C+1]`` (background first): foreground values that are
    not the per-pixel foreground maximum become 0; the background channel is unchanged."""
    fg = x[..., 1:]
    fg = jnp.where(fg != jnp.max(fg, axis=-1, keepdims=True), 0.0, fg)
    return jnp.concatenate([x[..., :1], fg], axis=-1)


def min_pooling_loss(x: jax.Array) -> jax.Array:
    """SEAM's ``adaptive_min_pooling_loss`` on ``[B,h,w,C]``: relu of the ``h*w // 4``
    smallest values of the per-pixel channel maximum, summed and divided by ``k * B``."""
    b, h, w, _ = x.shape
    k = h * w // 4
    smallest = -jax.lax.top_k(-jnp.max(x, axis=-1).reshape(b, -1), k)[0]
    return jnp.sum(jax.nn.relu(smallest)) / (k * b)


def top_fraction_mean(x: jax.Array, k: int) -> jax.Array:
    """Mean over images of the mean of each image's ``k`` largest entries."""
    return jnp.mean(jax.lax.top_k(x.reshape(x.shape[0], -1), k)[0])


def with_background(fg: jax.Array) -> jax.Array:
    """``[..., C]`` -> ``[..., C+1]`` with background ``1 - max_c`` first."""
    return jnp.concatenate([1.0 - jnp.max(fg, axis=-1, keepdims=True), fg], axis=-1)


def seam_losses(out1: Mapping[str, jax.Array], out2: Mapping[str, jax.Array],
                labels: jax.Array, size1: tuple[int, int], size2: tuple[int, int]
                ) -> dict[str, jax.Array]:
    """The loss terms from the model outputs of both views (see the module docstring).

    ``labels``: ``[B,C]`` multi-hot foreground labels; ``size1``/``size2``: the two views'
    input sizes. Returns ``{"loss", "loss_cls", "loss_rvmin", "loss_er", "loss_ecr"}``.
    """
    labels = labels.astype(jnp.float32)
    y = jnp.concatenate([jnp.ones_like(labels[:, :1]), labels], axis=-1)[:, None, None, :]
    cam1, rv1 = (resize_align_corners(out1[k], size1) for k in ("cam", "cam_rv"))
    cam2, rv2 = (resize_align_corners(out2[k], size2) for k in ("cam", "cam_rv"))
    loss_cls = (multilabel_soft_margin_loss(jnp.mean(cam1, axis=(1, 2)), labels)
                + multilabel_soft_margin_loss(jnp.mean(cam2, axis=(1, 2)), labels)) / 2
    loss_rvmin = (min_pooling_loss((rv1 * y)[..., 1:]) + min_pooling_loss((rv2 * y)[..., 1:])) / 2
    cam1 = resize_align_corners(max_norm(cam1), size2) * y[..., 1:]
    rv1 = resize_align_corners(max_norm(rv1), size2) * y
    cam2 = max_norm(cam2) * y[..., 1:]
    rv2 = max_norm(rv2) * y
    loss_er = jnp.mean(jnp.abs(cam1 - cam2))
    k = int(rv2.shape[-1] * size2[0] * size2[1] * ECR_TOP)
    target1 = jax.lax.stop_gradient(max_onehot(with_background(cam2)))
    target2 = jax.lax.stop_gradient(max_onehot(with_background(cam1)))
    loss_ecr = (top_fraction_mean(jnp.abs(target1 - rv1), k)
                + top_fraction_mean(jnp.abs(target2 - rv2), k))
    loss = loss_cls + loss_rvmin + loss_er + loss_ecr
    return {"loss": loss, "loss_cls": loss_cls, "loss_rvmin": loss_rvmin, "loss_er": loss_er,
            "loss_ecr": loss_ecr}


def seam_loss(model: SEAM, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Trainer loss function (``trainer.train``): both views through ``model``, then
    :func:`seam_losses`; metrics are the terms and the exact-match accuracy of view 1."""
    images = batch["image"]
    size1 = images.shape[1:3]
    size2 = tuple(int(np.floor(s * VIEW_SCALE)) for s in size1)
    out1 = model(images, rngs=rngs)
    out2 = model(resize_align_corners(images, size2), rngs=rngs)
    terms = seam_losses(out1, out2, batch["labels"], size1, size2)
    correct = jnp.all((out1["logits"] > 0) == (batch["labels"] > 0.5), axis=-1)
    loss = terms.pop("loss")
    return loss, {**terms, "exact_match": jnp.mean(correct)}


def _path_strings(path: Sequence[Any]) -> tuple[str, ...]:
    """A pytree key path as strings, without nnx's trailing ``value`` attribute."""
    out = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        out.append(str(name))
    return tuple(out[:-1] if out and out[-1] == "value" else out)


def param_labels(model: nnx.Module) -> dict[tuple[str, ...], str]:
    """``{parameter path: group}`` with groups of :data:`GROUPS` or :data:`FROZEN`.

    Backbone parameters: frozen when under one of ``backbone.frozen_prefixes`` (first path
    component after ``backbone``) or inside a BatchNorm, else weight (2+ dims) or bias.
    Everything outside ``backbone`` is a new layer.
    """
    frozen_prefixes = set(model.backbone.frozen_prefixes)
    norm_paths = {tuple(map(str, path)) for path, module in nnx.iter_modules(model)
                  if isinstance(module, (FrozenBatchNorm, nnx.BatchNorm))}
    labels = {}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = _path_strings(path)
        kind = "weight" if value.ndim > 1 else "bias"
        if names[0] != "backbone":
            labels[names] = f"new_{kind}"
        elif names[1] in frozen_prefixes or names[:-1] in norm_paths:
            labels[names] = FROZEN
        else:
            labels[names] = f"backbone_{kind}"
    return labels


def make_optimizer(model: nnx.Module, lr: float, num_steps: int, *, momentum: float = 0.9,
                   weight_decay: float = 5e-4, power: float = 0.9,
                   official_momentum: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SEAM's four-group poly SGD for ``model`` (``nnx.Optimizer(model, tx, wrt=nnx.Param)``);
    returns ``(tx, base schedule)``. ``official_momentum`` sets momentum = ``weight_decay``."""
    labels = param_labels(model)
    momentum = weight_decay if official_momentum else momentum
    schedule = optax.polynomial_schedule(init_value=lr, end_value=0.0, power=power,
                                         transition_steps=num_steps)

    def group(mult: float, decay: bool) -> optax.GradientTransformation:
        sgd = optax.sgd(lambda step: mult * schedule(step), momentum=momentum)
        return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if decay else sgd

    transforms = {name: group(*spec) for name, spec in GROUPS.items()}
    transforms[FROZEN] = optax.set_to_zero()

    def label_tree(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: labels[_path_strings(p)], params)

    return optax.multi_transform(transforms, label_tree), schedule
