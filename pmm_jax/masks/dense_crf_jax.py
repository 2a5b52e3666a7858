"""Dense CRF in JAX: a jitted permutohedral-lattice mean field, second backend to ``pmm_jax.masks.dense_crf``.

Same model as pydensecrf's ``DenseCRF2D`` as the official PMM code uses it (read from
densecrf's ``densecrf.cpp``, ``pairwise.cpp``, ``labelcompatibility.cpp`` and
``permutohedral.cpp``):

* unary ``U = -log(clip(p, 1e-5, 1))`` (``unary_from_softmax``), probabilities not renormalised;
* a Gaussian kernel on features ``(x/sxy, y/sxy)`` and a bilateral kernel on
  ``(x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb)`` (image channels in the order given), each
  filtered by a permutohedral lattice (Adams et al. 2010) and normalised symmetrically
  (``NORMALIZE_SYMMETRIC``): ``K~ Q = n * K(n * Q)`` with ``n = 1 / sqrt(K 1 + 1e-20)``;
* Potts compatibility: densecrf's pairwise term is ``-w * K~ Q`` and inference SUBTRACTS it,
  so every mean-field step is ``Q = softmax(-U + sum_k w_k * K~_k Q)`` over labels. The pixel
  itself is NOT excluded from the filtered sum (densecrf's lattice includes it);
* ``Q0 = softmax(-U)``, then ``iterations`` steps.

The permutohedral lattice itself (``pmm_jax.masks.permutohedral``) reproduces densecrf's
arithmetic, so posteriors match pydensecrf up to float rounding. This module builds the two
kernels' features and lattices of an image, runs the mean field on them, and sizes the
lattice tables: a lattice of N pixels is stored in a table of a static ``capacity`` (a
``LatticeCapacity``) whose true point count is always computed, so a table too small for an
image is detected, never silently wrong (``LatticeOverflowError`` from the host wrappers,
``LatticeStats`` from the jittable core).

Entry points:

* ``dense_crf(image, probs, params)`` mirrors ``pmm_jax.masks.dense_crf.dense_crf`` (numpy in and out);
* ``dense_crf_batched(image, probs[S, L, H, W], params)`` runs S label sets of one image (PPMG's
  per-class binary CRFs) through one lattice and one batched filter pass;
* ``dense_crf_images(images, probs, params)`` pads several images to one shape with a mask;
* ``dense_crf_padded(image, probs[S, L, H, W], params)`` pads one image up to a shape bucket
  (what the pipeline's ``crf.backend = "jax"`` runs: few compilations across a data set);
* ``crf_posterior`` is the pure jittable core for device-resident pipelines.

The host wrappers size the tables themselves unless given a capacity: they start from the
sizes that fitted earlier images of the same shape and parameters (``initial_capacity`` the
first time) and, when the reported point count exceeds a table, grow it to that count rounded
up to one of four sizes per octave and run again (bounded recompilation, at most 25 % slack).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pmm_jax.masks.dense_crf import UNARY_CLIP, CRFParams
from pmm_jax.masks.permutohedral import build_lattice, normalized_filter

# Feature dimensions of the two kernels.
GAUSSIAN_DIM = 2
BILATERAL_DIM = 5
# Smallest table the host wrappers allocate.
MIN_CAPACITY = 256


class LatticeOverflowError(RuntimeError):
    """A lattice table was smaller than the number of lattice points of an image."""


class LatticeCapacity(NamedTuple):
    """Static table sizes (number of lattice points) of the Gaussian and bilateral lattices."""

    gaussian: int
    bilateral: int


class LatticeStats(NamedTuple):
    """What the jittable core reports per (Gaussian, bilateral) lattice: ``[..., 2]`` arrays."""

    num_points: jax.Array
    keys_in_range: jax.Array


def hard_capacity(height, width):
    """Table sizes that can never be too small: ``(d + 1) * H * W`` points for each kernel."""
    n = height * width
    return LatticeCapacity((GAUSSIAN_DIM + 1) * n, (BILATERAL_DIM + 1) * n)


def round_capacity(num_points, num_pixels, dim):
    """Table size for ``num_points``: rounded up to 4 sizes per octave, capped by the hard bound.

    Why: a tight table makes the blur cheap, and few distinct sizes keep the number of
    compilations small across images.
    """
    m = max(int(num_points), MIN_CAPACITY)
    step = 2 ** max(int(math.log2(m)) - 2, 0)
    return min(-(-m // step) * step, (dim + 1) * num_pixels)


@functools.partial(jax.jit, static_argnames=("height", "width"))
def gaussian_features(height, width, sxy):
    """densecrf's Gaussian features ``(x / sxy, y / sxy)``: ``[H * W, 2]`` float32, row-major."""
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
    feats = jnp.stack([x, y], axis=-1) / jnp.float32(sxy)
    return feats.reshape(height * width, GAUSSIAN_DIM)


@jax.jit
def bilateral_features(image, sxy, srgb):
    """densecrf's bilateral features ``(x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb)``: ``[H*W, 5]``."""
    height, width = image.shape[:2]
    colour = jnp.asarray(image, dtype=jnp.float32).reshape(height * width, 3) / jnp.float32(srgb)
    return jnp.concatenate([gaussian_features(height, width, sxy), colour], axis=1)


def image_lattices(image, params, capacity, valid=None):
    """The (Gaussian, bilateral) lattices of one ``[H, W, 3]`` image, ``valid [H, W]`` or None.

    Depends on the image only, never on the label scores: build once, reuse for every
    iteration and every label set (``crf_mean_field``). Not a jit boundary itself: each
    ``build_lattice`` is jitted on its own, so a lattice of a given size and capacity compiles
    once for every parameter set.
    """
    image = jnp.asarray(image)
    height, width = image.shape[:2]
    valid = None if valid is None else jnp.asarray(valid, bool).reshape(-1)
    gauss = build_lattice(gaussian_features(height, width, params.gauss_sxy),
                          capacity.gaussian, valid)
    bilateral = build_lattice(
        bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb),
        capacity.bilateral, valid)
    return gauss, bilateral


def lattice_stats(lattices):
    """``LatticeStats`` of a (Gaussian, bilateral) lattice pair (batched or not)."""
    return LatticeStats(jnp.stack([lat.num_points for lat in lattices], axis=-1),
                        jnp.stack([lat.keys_in_range for lat in lattices], axis=-1))


def mean_field(unary, lattices, compats, iterations):
    """densecrf's ``inference``: ``Q = softmax(-U + sum_k w_k K~_k Q)``, ``iterations`` times.

    ``unary [N, S, L]`` (S independent label sets sharing the lattices, softmax over L);
    ``lattices`` and ``compats`` (Potts weights) pair up. All label sets go through each
    filter as one ``[N, S * L]`` signal.
    """
    num_pixels, num_sets, num_labels = unary.shape

    def step(_, q):
        flat = q.reshape(num_pixels, num_sets * num_labels)
        energy = -unary
        for lattice, compat in zip(lattices, compats):
            message = normalized_filter(lattice, flat).reshape(unary.shape)
            energy = energy + compat * message
        return jax.nn.softmax(energy, axis=-1)

    return jax.lax.fori_loop(0, iterations, step, jax.nn.softmax(-unary, axis=-1))


def crf_mean_field(probs, lattices, params):
    """Posterior ``[S, L, H, W]`` of ``probs [S, L, H, W]`` given ``image_lattices``' output.

    Unary ``-log(clip(p, 1e-5, 1))``; compatibilities and iterations from ``params``, passed
    as traced values so that one compilation serves every parameter set.
    """
    compats = jnp.asarray([params.gauss_compat, params.bilateral_compat], jnp.float32)
    return _mean_field_posterior(probs, lattices, compats, params.iterations)


@jax.jit
def _mean_field_posterior(probs, lattices, compats, iterations):
    """``crf_mean_field`` with the Potts weights ``compats [2]`` and ``iterations`` traced."""
    num_sets, num_labels, height, width = probs.shape
    p = jnp.asarray(probs, jnp.float32).reshape(num_sets, num_labels, height * width)
    unary = -jnp.log(jnp.clip(p, UNARY_CLIP, 1.0)).transpose(2, 0, 1)
    q = mean_field(unary, lattices, (compats[0], compats[1]), iterations)
    return q.transpose(1, 2, 0).reshape(num_sets, num_labels, height, width)


@functools.partial(jax.jit, static_argnames=("params", "capacity"))
def crf_posterior(image, probs, params, capacity, valid=None):
    """Pure jittable dense CRF of one image: ``(posterior [S, L, H, W], LatticeStats)``.

    ``image [H, W, 3]`` uint8, ``probs [S, L, H, W]`` scores in [0, 1] (S label sets, e.g.
    PPMG's per-class binary CRFs), ``params`` a ``CRFParams`` and ``capacity`` a
    ``LatticeCapacity`` (both static), ``valid [H, W]`` bool padding mask or None. For a
    device-resident pipeline (vmap it over images); the posterior is only valid where the
    stats fit ``capacity`` (``check_stats`` raises otherwise).
    """
    lattices = image_lattices(image, params, capacity, valid)
    return crf_mean_field(probs, lattices, params), lattice_stats(lattices)


@functools.partial(jax.jit, static_argnames=("params", "capacity"))
def batch_lattices(images, params, capacity, valid):
    """``image_lattices`` over a padded batch ``[B, H, W, 3]`` with ``valid [B, H, W]``."""
    return batched(lambda im, v: image_lattices(im, params, capacity, v), images, valid)


def batched(fn, *args):
    """``jax.vmap(fn)(*args)``; a batch of one runs ``fn`` unbatched (XLA's CPU gathers and
    scatters, the lattice's core, run about 1.5x slower with a batch dimension)."""
    if jax.tree.leaves(args)[0].shape[0] != 1:
        return jax.vmap(fn)(*args)
    out = fn(*jax.tree.map(lambda a: a[0], args))
    return jax.tree.map(lambda a: a[None], out)


@jax.jit
def _batch_mean_field(probs, lattices, compats, iterations):
    """``_mean_field_posterior`` over a padded batch ``[B, S, L, H, W]``."""
    return batched(lambda p, lat: _mean_field_posterior(p, lat, compats, iterations),
                   probs, lattices)


def batch_mean_field(probs, lattices, params):
    """Posterior ``[B, S, L, H, W]`` of a padded batch ``probs [B, S, L, H, W]`` given
    ``batch_lattices``' output (as ``crf_mean_field`` per image)."""
    compats = jnp.asarray([params.gauss_compat, params.bilateral_compat], jnp.float32)
    return _batch_mean_field(probs, lattices, compats, params.iterations)


def check_stats(stats, capacity):
    """Raise ``LatticeOverflowError`` where a lattice outgrew its table or its 16-bit keys."""
    points = np.asarray(stats.num_points).reshape(-1, 2).max(axis=0)
    in_range = np.asarray(stats.keys_in_range).reshape(-1, 2).all(axis=0)
    for name, count, size, ok in zip(("gaussian", "bilateral"), points, capacity, in_range):
        if not ok:
            raise LatticeOverflowError(
                f"{name} lattice coordinates exceed 16 bits: the kernel width is too small "
                "for this image size")
        if count > size:
            raise LatticeOverflowError(
                f"{name} lattice has {int(count)} points but its table holds {size}; "
                "pass a larger LatticeCapacity (hard_capacity(H, W) can never overflow) "
                "or capacity=None to size it from the image")


def initial_capacity(height, width, params):
    """First table sizes tried for an image shape when no capacity is given.

    Gaussian: its lattice depends only on the shape; densecrf's embedding puts about 1.16
    points per unit area of the ``(x/sxy, y/sxy)`` plane, so 1.25 times the padded area is
    enough. Bilateral: content dependent (0.05 N to 3.4 N on the VOC samples with the two
    parameter sets here); N / 4 to start, grown on overflow.
    """
    n = height * width
    area = (width / params.gauss_sxy + 2) * (height / params.gauss_sxy + 2)
    return LatticeCapacity(round_capacity(1.25 * area, n, GAUSSIAN_DIM),
                           round_capacity(n / 4, n, BILATERAL_DIM))


# Table sizes per (height, width, params) that fitted every image seen so far (grow only).
_capacity_cache = {}


def _sized_lattices(build, height, width, params, capacity):
    """``build(capacity) -> lattices`` with tables that fit, checked.

    With ``capacity`` None, the sizes cached for this shape and parameters (else
    ``initial_capacity``) are tried first; when a reported point count exceeds its table, the
    table grows to that count (``round_capacity``), the cache keeps it and the lattice is
    built again. A table is never too small silently, and across a data set the sizes settle
    after the largest lattices (few recompilations).
    """
    if capacity is None:
        key = (height, width, params)
        capacity = _capacity_cache.get(key) or initial_capacity(height, width, params)
        lattices = build(capacity)
        counts = np.asarray(lattice_stats(lattices).num_points).reshape(-1, 2).max(axis=0)
        n = height * width
        grown = LatticeCapacity(
            max(capacity.gaussian, round_capacity(counts[0], n, GAUSSIAN_DIM)),
            max(capacity.bilateral, round_capacity(counts[1], n, BILATERAL_DIM)))
        if grown != capacity:
            capacity, lattices = grown, build(grown)
        _capacity_cache[key] = capacity
    else:
        lattices = build(capacity)
    check_stats(lattice_stats(lattices), capacity)
    return lattices


def sized_batch_lattices(images, params, valid, capacity=None):
    """``batch_lattices`` of a padded batch with tables that fit (``_sized_lattices``): the
    lattices stay on the device for the mean field."""
    height, width = images.shape[1:3]
    return _sized_lattices(lambda cap: batch_lattices(images, params, cap, valid),
                           height, width, params, capacity)


def _validate(image, probs, params):
    """Shape, dtype and type checks shared by the host wrappers (as ``pmm_jax.masks.dense_crf``)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if probs.ndim != 4 or probs.shape[0] < 1 or probs.shape[1] < 1:
        raise ValueError(f"probs must be [S, L, H, W] with S, L >= 1, got shape {probs.shape}")
    if probs.shape[2:] != image.shape[:2]:
        raise ValueError(
            f"probs spatial shape {probs.shape[2:]} does not match image {image.shape[:2]}")
    if not np.issubdtype(probs.dtype, np.floating) or not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite floating-point scores")
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a CRFParams, got {type(params).__name__}")


def dense_crf_batched(image, probs, params, capacity=None):
    """S label sets of one image through one lattice: ``[S, L, H, W]`` float32 numpy.

    ``probs [S, L, H, W]``: e.g. PPMG's per-class binary CRFs ``[(1 - x_c) ** a, x_c]``
    stacked over the present classes; each set is an independent CRF with its own softmax.
    ``capacity``: a ``LatticeCapacity``, or None to size the tables automatically
    (``_sized_lattices``). Raises ``LatticeOverflowError`` rather than return a wrong posterior.
    """
    image, probs = np.asarray(image), np.asarray(probs)
    _validate(image, probs, params)
    probs = probs.astype(np.float32)
    height, width = image.shape[:2]
    lattices = _sized_lattices(lambda cap: image_lattices(image, params, cap),
                               height, width, params, capacity)
    return np.asarray(crf_mean_field(probs, lattices, params))


def dense_crf(image, probs, params, capacity=None):
    """Mean-field posterior ``[L, H, W]`` float32: drop-in for ``pmm_jax.masks.dense_crf.dense_crf``."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [L, H, W] with L >= 1, got shape {probs.shape}")
    return dense_crf_batched(image, probs[None], params, capacity)[0]


def dense_crf_images(images, probs, params, capacity=None, pad_to=None):
    """Dense CRFs of several images in one call, padded to one shape with a validity mask.

    ``images``: sequence of ``[H_i, W_i, 3]`` uint8; ``probs``: sequence of
    ``[S_i, L, H_i, W_i]`` (L shared; S_i may differ: missing label sets are padded and
    dropped). ``pad_to``: ``(H, W)`` to pad to (a fixed size avoids recompiling per batch
    shape), default the largest image. Returns the list of ``[S_i, L, H_i, W_i]`` posteriors,
    each equal to what ``dense_crf_batched`` gives for that image alone.
    """
    images = [np.asarray(im) for im in images]
    probs = [np.asarray(p) for p in probs]
    if len(images) != len(probs) or not images:
        raise ValueError("images and probs must be non-empty sequences of the same length")
    for image, p in zip(images, probs):
        _validate(image, p, params)
    if len({p.shape[1] for p in probs}) != 1:
        raise ValueError("every image must have the same number of labels L")
    height, width = pad_to or (max(im.shape[0] for im in images), max(im.shape[1] for im in images))
    num_sets = max(p.shape[0] for p in probs)
    num_labels = probs[0].shape[1]

    batch = len(images)
    padded_images = np.zeros((batch, height, width, 3), np.uint8)
    padded_probs = np.ones((batch, num_sets, num_labels, height, width), np.float32)
    valid = np.zeros((batch, height, width), bool)
    for b, (image, p) in enumerate(zip(images, probs)):
        h, w = image.shape[:2]
        if h > height or w > width:
            raise ValueError(
                f"image {b} of shape {image.shape[:2]} exceeds pad_to {(height, width)}")
        padded_images[b, :h, :w] = image
        padded_probs[b, :p.shape[0], :, :h, :w] = p
        valid[b, :h, :w] = True

    lattices = _sized_lattices(lambda cap: batch_lattices(padded_images, params, cap, valid),
                               height, width, params, capacity)
    posterior = np.asarray(batch_mean_field(padded_probs, lattices, params))
    return [posterior[b, :p.shape[0], :, :im.shape[0], :im.shape[1]]
            for b, (im, p) in enumerate(zip(images, probs))]


def dense_crf_padded(image, probs, params, multiple=64, capacity=None):
    """``dense_crf_batched`` of one image padded, with a validity mask, up to the next
    multiple of ``multiple`` pixels in height and width: ``[S, L, H, W]`` float32 numpy,
    equal to the unpadded result.

    What the pipeline runs for ``crf.backend = "jax"``: images of nearby sizes share one
    compiled shape and one table-size cache entry, and, as in ``dense_crf_batched``, the
    lattice builds and the mean field compile independently of the kernel widths, so the
    pseudo-mask and segmentation-test parameter sets share them too.
    """
    image, probs = np.asarray(image), np.asarray(probs)
    _validate(image, probs, params)
    height, width = image.shape[:2]
    padded_height = -(-height // multiple) * multiple
    padded_width = -(-width // multiple) * multiple
    padded_image = np.zeros((padded_height, padded_width, 3), np.uint8)
    padded_image[:height, :width] = image
    padded_probs = np.ones((*probs.shape[:2], padded_height, padded_width), np.float32)
    padded_probs[:, :, :height, :width] = probs
    valid = np.zeros((padded_height, padded_width), bool)
    valid[:height, :width] = True
    lattices = _sized_lattices(lambda cap: image_lattices(padded_image, params, cap, valid),
                               padded_height, padded_width, params, capacity)
    posterior = np.asarray(crf_mean_field(padded_probs, lattices, params))
    return posterior[:, :, :height, :width]
