"""Jitted multi-crop CAM inference (PMM's ``infer_multi_crop``) for padded eval batches.

The semantics are those of ``pmm_jax.cams.multicrop_tiling`` (see ../shared/pmm-reference.md,
"Multi-crop"): at every scale the image is tiled (``multicrop_tiling.tile_boxes``); each tile is cut
from the original image, resized to ``crop x crop`` (bilinear, antialiased when shrinking,
like PIL's ``BILINEAR``) and run through the classifier, also mirrored; each view's ReLU'd CAM
is mirrored back, resized to its box (bilinear, half-pixel centres: torch's
``align_corners=False``), multiplied by the image-level label and summed into the full map,
which is divided by the per-pixel view count. The result is then divided by its per-class
maximum, as ``multiscale_inference`` does.

Static shapes and sharding: the host lists the tiles of every image of an eval batch
(``plan``), keeps them on the device that holds the image's row (the batch is sharded over
the ``"data"`` mesh axis, a contiguous block of rows per device) and cuts them into chunks of
``tile_batch / device_count`` tiles per device, padded with invalid tiles; every process runs
the largest chunk count of any process. One jitted ``shard_map`` step per chunk, on every
device at once: crop and resize its tiles from its own images (interpolation matrices,
dynamic boxes, static sizes), run the classifier on the tiles and their mirror images, and
add each tile's CAM, resized into its box of the ``[H, W]`` canvas, to the per-row sum and
view count that stay on that device between chunks (donated). A last jitted function divides
and normalises; each process gets back its own rows. Nothing crosses devices but the model.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from pmm_jax.cams import multicrop_tiling
from pmm_jax.training import distributed
from pmm_jax.training import sharding as shd
from pmm_jax.training.sharded_apply import ReplicatedModel
from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD

# The ImageNet statistics on the 0..1 scale of the tiles, from the 0..255 ones in constants (the
# same float32 values as data.pipeline's; importing that would pull in TensorFlow).
_MEAN_01 = np.asarray(IMAGENET_MEAN) / 255.0
_STD_01 = np.asarray(IMAGENET_STD) / 255.0

# Tile descriptor columns: row of the image on its device, box (y1, x1, y2, x2), valid flag.
TILE_FIELDS = ("slot", "y1", "x1", "y2", "x2", "valid")
_HIGHEST = jax.lax.Precision.HIGHEST


def interp_matrix(out_size: int, out_start, out_len, in_size: int, in_start, in_len, *,
                  antialias: bool) -> jax.Array:
    """``[out_size, in_size]`` bilinear weights mapping the source interval
    ``[in_start, in_start + in_len)`` onto the target interval ``[out_start, out_start +
    out_len)``; rows outside the target interval are 0. Starts and lengths may be traced.

    Inside the intervals this is ``jax.image.resize(source, out_len, "bilinear", antialias)``:
    the triangle kernel at half-pixel centres, widened by ``in_len / out_len`` when shrinking
    with ``antialias`` (PIL's ``BILINEAR``; without it torch's ``align_corners=False``), and
    normalised over the source pixels inside the interval (borders are clamped).
    """
    out_len = jnp.maximum(jnp.asarray(out_len, jnp.float32), 1.0)
    in_len = jnp.maximum(jnp.asarray(in_len, jnp.float32), 1.0)
    inv_scale = in_len / out_len
    out_pos = jnp.arange(out_size, dtype=jnp.float32) - out_start
    in_pos = jnp.arange(in_size, dtype=jnp.float32) - in_start
    sample = (out_pos + 0.5) * inv_scale - 0.5
    kernel_scale = jnp.maximum(inv_scale, 1.0) if antialias else 1.0
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - in_pos[None, :]) / kernel_scale)
    weights = jnp.where((in_pos >= 0) & (in_pos < in_len), weights, 0.0)
    total = jnp.sum(weights, axis=1, keepdims=True)
    weights = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where(((out_pos >= 0) & (out_pos < out_len))[:, None], weights, 0.0)


def cut_tiles(images: jax.Array, tiles: jax.Array, crop: int) -> jax.Array:
    """ImageNet-normalised ``[T, crop, crop, 3]`` tiles of uint8 ``images[B, H, W, 3]``;
    ``tiles[T, 6]`` as :data:`TILE_FIELDS`."""
    _, h, w, _ = images.shape
    slot, y1, x1, y2, x2 = (tiles[:, i] for i in range(5))

    def one(s, y1, x1, y2, x2):
        wy = interp_matrix(crop, 0, crop, h, y1, y2 - y1, antialias=True)
        wx = interp_matrix(crop, 0, crop, w, x1, x2 - x1, antialias=True)
        source = images[s].astype(jnp.float32) / 255.0
        return jnp.einsum("oh,hwc,pw->opc", wy, source, wx, precision=_HIGHEST)

    cut = jax.vmap(one)(slot, y1, x1, y2, x2)
    return (cut - jnp.asarray(_MEAN_01)) / jnp.asarray(_STD_01)


def tile_cams(model_cam: Callable, model, crops: jax.Array, flip: bool) -> jax.Array:
    """The ReLU'd CAMs ``[T, h, w, C]`` of ``crops``, plus those of their mirror images
    mirrored back when ``flip`` (each view is one tile of the count)."""
    views = jnp.concatenate([crops, crops[:, :, ::-1]]) if flip else crops
    cams = jax.nn.relu(model_cam(model, views))
    if flip:
        n = crops.shape[0]
        cams = cams[:n] + cams[n:, :, ::-1]
    return cams


def add_tiles(total: jax.Array, count: jax.Array, cams: jax.Array, tiles: jax.Array,
              views: int) -> tuple[jax.Array, jax.Array]:
    """Adds each tile's CAM, resized into its box, to ``total[slot]`` ``[B, H, W, C]`` and
    ``views`` to ``count[slot]`` ``[B, H, W]`` over the box (invalid tiles add nothing)."""
    _, h, w, _ = total.shape
    ch, cw = cams.shape[1:3]

    def step(carry, x):
        total, count = carry
        cam, tile = x
        slot, y1, x1, y2, x2, valid = (tile[i] for i in range(len(TILE_FIELDS)))
        wy = interp_matrix(h, y1, y2 - y1, ch, 0, ch, antialias=False)
        wx = interp_matrix(w, x1, x2 - x1, cw, 0, cw, antialias=False)
        ok = valid.astype(jnp.float32)
        placed = jnp.einsum("Hh,hwc,Ww->HWc", wy, cam, wx, precision=_HIGHEST) * ok
        rows = (jnp.arange(h) >= y1) & (jnp.arange(h) < y2)
        cols = (jnp.arange(w) >= x1) & (jnp.arange(w) < x2)
        covered = (rows[:, None] & cols[None, :]).astype(jnp.float32) * (views * ok)
        return (total.at[slot].add(placed), count.at[slot].add(covered)), None

    (total, count), _ = jax.lax.scan(step, (total, count), (cams, tiles))
    return total, count


def finish(total: jax.Array, count: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the views covering each pixel, times the label, divided by the per-class
    maximum: ``[B, H, W, C]`` like ``multiscale_inference.normalise_cam``."""
    cams = total / jnp.maximum(count, 1.0)[..., None] * labels[:, None, None, :]
    return cams / (jnp.max(cams, axis=(1, 2), keepdims=True) + 1e-5)


def plan(batch: Mapping[str, np.ndarray], rows: Sequence[int], *, scales: Sequence[float],
         crop: int, stride: int, devices: int, per_device: int) -> list[np.ndarray]:
    """Tile chunks of this process's eval batch: a list of int32 ``[devices * per_device, 6]``
    arrays (:data:`TILE_FIELDS`), device j's tiles in block j, padded with invalid tiles.

    Only ``rows`` get tiles (others, e.g. padding rows or finished images, stay empty). Row r
    lives on local device ``r // (B / devices)``, so its tiles are listed in that block.
    """
    size = len(batch["valid"])
    rows_per_device = size // devices
    lists: list[list[tuple[int, ...]]] = [[] for _ in range(devices)]
    for r in rows:
        height, width = int(batch["height"][r]), int(batch["width"][r])
        for scale in scales:
            for x1, y1, x2, y2 in multicrop_tiling.tile_boxes(width, height, scale, crop, stride):
                lists[r // rows_per_device].append((r % rows_per_device, y1, x1, y2, x2, 1))
    count = max((math.ceil(len(t) / per_device) for t in lists), default=0)
    chunks = []
    for k in range(count):
        chunk = padding_tiles(devices * per_device).reshape(devices, per_device, -1)
        for j, tiles in enumerate(lists):
            part = tiles[k * per_device:(k + 1) * per_device]
            if part:
                chunk[j, :len(part)] = part
        chunks.append(chunk.reshape(devices * per_device, len(TILE_FIELDS)))
    return chunks


def padding_tiles(n: int) -> np.ndarray:
    """``n`` invalid tiles (a 1x1 box at the origin, ``valid`` 0): they add nothing."""
    tiles = np.zeros((n, len(TILE_FIELDS)), np.int32)
    tiles[:, 3:5] = 1
    return tiles


def chunk_step(graphdef: nnx.GraphDef, model_cam: Callable, crop: int, flip: bool,
               mesh: jax.sharding.Mesh) -> Callable:
    """The jitted step of one tile chunk on ``mesh``: ``(state, images, total, count, tiles)
    -> (total, count)``, the model state replicated, everything else split over the data axis
    (each device cuts, classifies and adds its own tiles), ``total`` and ``count`` donated."""
    views = 2 if flip else 1
    spec = PartitionSpec(shd.DATA_AXIS)

    def local_step(state, images, total, count, tiles):
        eval_model = nnx.merge(graphdef, state)
        eval_model.eval()
        cams = tile_cams(model_cam, eval_model, cut_tiles(images, tiles, crop), flip)
        return add_tiles(total, count, cams, tiles, views)

    return jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, spec, spec),
                      out_specs=(spec, spec), check_vma=False),
        donate_argnums=(2, 3))


class MultiCropCAM:
    """``MultiCropCAM(model, model_cam, ...)(batch, rows) -> [B, H, W, C]`` numpy CAMs of this
    process's eval batch (rows not in ``rows`` are undefined).

    Args:
      model: the classifier (run in eval mode, replicated).
      model_cam: ``(model, images) -> [N, h, w, C]`` raw CAM (``classifier.ClassifierMethod.cam``).
      scales, crop, stride: the tiling (``multicrop_tiling.tile_boxes``).
      flip: also run every tile mirrored.
      tile_batch: tiles per step over all devices of all processes (each also mirrored);
        must divide by the number of devices.
      batch_size_key / tile_batch_key: config keys quoted in errors.

    Every process must call it for the same eval batches (it runs collectives).
    """

    def __init__(self, model: nnx.Module, model_cam: Callable, *, scales: Sequence[float],
                 crop: int, stride: int, flip: bool, tile_batch: int,
                 batch_size_key: str = "batch_size", tile_batch_key: str = "tile_batch"):
        devices = jax.device_count()
        if tile_batch % devices:
            raise ValueError(f"{tile_batch_key}={tile_batch} must be a multiple of the number "
                             f"of devices ({devices})")
        self.scales, self.crop, self.stride = tuple(scales), int(crop), int(stride)
        self.per_device = tile_batch // devices
        self.batch_size_key = batch_size_key
        self.model = ReplicatedModel(model)
        self.mesh = self.model.mesh
        views = 2 if flip else 1
        spec = PartitionSpec(shd.DATA_AXIS)

        def local_step(state, images, total, count, tiles):
            cams = tile_cams(model_cam, self.model.eval_model(state),
                             cut_tiles(images, tiles, self.crop), flip)
            return add_tiles(total, count, cams, tiles, views)

        self._step = jax.jit(
            jax.shard_map(local_step, mesh=self.mesh, in_specs=(PartitionSpec(), spec, spec,
                                                                spec, spec),
                          out_specs=(spec, spec), check_vma=False),
            donate_argnums=(2, 3))
        self._finish = jax.jit(finish, out_shardings=self.model.data)
        # float32 zeros sharded over "data", made on the devices (compiled once per shape).
        self._zeros = jax.jit(lambda shape: jnp.zeros(shape, jnp.float32), static_argnums=0,
                              out_shardings=self.model.data)

    def __call__(self, batch: Mapping[str, np.ndarray], rows: Sequence[int]) -> np.ndarray:
        local = {k: np.asarray(batch[k]) for k in ("raw", "labels")}
        device_batch = self.model.shard(local, self.batch_size_key)
        b, h, w = device_batch["raw"].shape[:3]
        total, count = self._zeros((b, h, w, local["labels"].shape[-1])), self._zeros((b, h, w))
        chunks = plan(batch, rows, scales=self.scales, crop=self.crop, stride=self.stride,
                      devices=jax.local_device_count(), per_device=self.per_device)
        # Every process runs as many steps as the busiest one (the steps are collective).
        steps = max(distributed.gather_ints({"chunks": len(chunks)})["chunks"])
        empty = padding_tiles(jax.local_device_count() * self.per_device)
        for k in range(steps):
            tiles = chunks[k] if k < len(chunks) else empty
            tiles = self.model.shard({"tiles": tiles}, "tile_batch")["tiles"]
            total, count = self._step(self.model.state, device_batch["raw"], total, count, tiles)
        return np.asarray(self.model.local_rows(self._finish(total, count, device_batch["labels"])))
