"""The whole per-image pseudo-mask path on the device, jitted, several images at a time: what
``crf.backend = "jax"`` runs.

:func:`device_core` takes a padded batch (images, CAMs, which classes and pixels are real)
and returns label indices: normalisation, CVS, the CRF inputs (``masks/core.py`` on
``jax.numpy``), the dense CRF (``masks/dense_crf_jax.py``) and the label rule, in one
program. :func:`run_batch` pads a group of loaded images to one shape bucket (height and
width up to a multiple of ``PAD_MULTIPLE``; binary-CRF variants: the class count up to a
power of two, a missing class is an all-background CRF that never wins; joint-CRF variants
keep the exact count, as a zero channel would change the joint CRF), builds the lattices
with tables that fit (``dense_crf_jax.sized_batch_lattices``), runs the rest
(:func:`labels_on_lattices`) and brings the indices back; decoding them to mask
values and writing PNGs stay on the host (``masks/generator.py``).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pmm_jax.masks import core, dense_crf_jax
from pmm_jax.masks.dense_crf import CRFParams
from pmm_jax.masks.variants import Variant

# Height and width are padded up to a multiple of this; most VOC images fall in three
# buckets (384 x 512, 512 x 384, 512 x 512).
PAD_MULTIPLE = 64


@functools.partial(jax.jit, static_argnames=("variant", "official_minmax"))
def _crf_inputs(cams, present, valid, alpha, t, s, *, variant, official_minmax):
    """``core.crf_inputs`` over a padded batch: ``(x [B, K, H, W], probs [B, S, L, H, W])``."""
    return dense_crf_jax.batched(
        lambda cam, real, pixels: core.crf_inputs(jnp, variant, cam, alpha, t, s,
                                                  official_minmax, real, pixels),
        cams, present, valid)


@functools.partial(jax.jit, static_argnames=("variant",))
def _label_indices(x, posterior, present, valid, *, variant):
    """``core.label_indices`` over a padded batch: ``[B, H, W]`` int32."""
    return dense_crf_jax.batched(
        lambda xi, post, real, pixels: core.label_indices(
            jnp, variant, xi, post, real, pixels).astype(jnp.int32),
        x, posterior, present, valid)


def labels_on_lattices(lattices, cams, present, valid, alpha, t, s, *, variant: Variant,
                       params: CRFParams, official_minmax: bool = False):
    """Label indices ``[B, H, W]`` int32 of a padded batch whose (Gaussian, bilateral)
    lattices are built (``dense_crf_jax.batch_lattices``): the CRF inputs, the mean field
    and the label rule, three jitted programs whose arrays stay on the device (the mean
    field is ``dense_crf_jax``'s own program, shared by every variant). Arguments as
    :func:`device_core`'s."""
    x, probs = _crf_inputs(cams, present, valid, alpha, t, s, variant=variant,
                           official_minmax=official_minmax)
    posterior = dense_crf_jax.batch_mean_field(probs, lattices, params)
    return _label_indices(x, posterior, present, valid, variant=variant)


@functools.partial(jax.jit, static_argnames=("variant", "params", "capacity",
                                             "official_minmax"))
def device_core(images, cams, present, valid, alpha, t, s, *, variant: Variant,
                params: CRFParams, capacity: dense_crf_jax.LatticeCapacity,
                official_minmax: bool = False):
    """Label indices of a padded batch, and the lattices' ``LatticeStats``: the whole
    per-image path as one program (:func:`run_batch` runs its two halves, so that a lattice
    table that has to grow is rebuilt alone and the lattices compile once for every variant).

    Args:
        images: ``[B, H, W, 3]`` uint8.
        cams: ``[B, K, H, W]`` float32 CAMs of the image's classes (0 where padded).
        present: ``[B, K]`` bool, the real classes.
        valid: ``[B, H, W]`` bool, the real pixels.
        alpha, t, s: the background exponent and CVS's threshold and scale (traced).
        variant, params, capacity, official_minmax: static: the ``Variant`` record, the
            ``CRFParams``, the ``LatticeCapacity`` and the official min-max switch.

    Returns:
        ``(labels [B, H, W] int32, stats)``: 0 background, ``k + 1`` class k, ``K + 1``
        unlabelled; 0 on padded pixels. Valid only where ``stats`` fit ``capacity``
        (``dense_crf_jax.check_stats``).
    """
    lattices = dense_crf_jax.batch_lattices(images, params, capacity, valid)
    labels = labels_on_lattices(lattices, cams, present, valid, alpha, t, s, variant=variant,
                                params=params, official_minmax=official_minmax)
    return labels, dense_crf_jax.lattice_stats(lattices)


def bucket(height: int, width: int, num_classes: int, variant: Variant) -> tuple[int, int, int]:
    """``(H, W, K)`` an image of this size and class count is padded to."""
    classes = 1 << (num_classes - 1).bit_length() if variant.crf == "binary" else num_classes
    return (-(-height // PAD_MULTIPLE) * PAD_MULTIPLE, -(-width // PAD_MULTIPLE) * PAD_MULTIPLE,
            classes)


def run_batch(images: Sequence[np.ndarray], cams: Sequence[np.ndarray], settings,
              batch_size: int) -> list[np.ndarray]:
    """Label indices ``[h, w]`` (numpy) of images that share one :func:`bucket`.

    ``images``: uint8 ``[h, w, 3]``; ``cams``: float32 ``[k, h, w]`` each (k >= 1);
    ``settings``: a ``worker.Settings``. The batch is padded to a power of two at most
    ``batch_size`` by repeating its first image (few compiled shapes); more images than
    ``batch_size`` run in several calls.
    """
    heights, widths = [im.shape[0] for im in images], [im.shape[1] for im in images]
    height, width, classes = bucket(max(heights), max(widths), max(len(c) for c in cams),
                                    settings.variant)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        size = 1 << (len(chunk) - 1).bit_length()
        padded_images = np.zeros((size, height, width, 3), np.uint8)
        padded_cams = np.zeros((size, classes, height, width), np.float32)
        present = np.zeros((size, classes), bool)
        valid = np.zeros((size, height, width), bool)
        for b in range(size):
            i = chunk[b] if b < len(chunk) else chunk[0]
            h, w, k = heights[i], widths[i], len(cams[i])
            padded_images[b, :h, :w] = images[i]
            padded_cams[b, :k, :h, :w] = cams[i]
            present[b, :k] = True
            valid[b, :h, :w] = True

        lattices = dense_crf_jax.sized_batch_lattices(padded_images, settings.crf, valid)
        labels = np.asarray(labels_on_lattices(
            lattices, padded_cams, present, valid, settings.alpha, settings.t, settings.s,
            variant=settings.variant, params=settings.crf,
            official_minmax=settings.official_minmax))
        out.extend(labels[b, :heights[i], :widths[i]] for b, i in enumerate(chunk))
    return out


def lower_device_core(batch: int, height: int, width: int, classes: int, variant: Variant,
                      params: CRFParams, capacity: dense_crf_jax.LatticeCapacity | None = None,
                      official_minmax: bool = False):
    """:func:`device_core` lowered for a batch shape, from shapes only (no data): what an
    ahead-of-time compile table calls ``.compile()`` on. ``capacity`` None: the tables that
    can never be too small (``dense_crf_jax.hard_capacity``)."""
    spec = jax.ShapeDtypeStruct
    scalar = spec((), jnp.float32)
    return device_core.lower(
        spec((batch, height, width, 3), jnp.uint8), spec((batch, classes, height, width),
                                                         jnp.float32),
        spec((batch, classes), jnp.bool_), spec((batch, height, width), jnp.bool_),
        scalar, scalar, scalar, variant=variant, params=params,
        capacity=capacity or dense_crf_jax.hard_capacity(height, width),
        official_minmax=official_minmax)
