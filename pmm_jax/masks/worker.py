"""One image's mask, from its files to its PNG, in numpy: what a generator worker runs.

``pmm_jax.masks.generator`` hands each image to a worker process (pydensecrf backend) or runs
it in its own process (one worker): read and check the record, the CRF inputs of the image's
variant (``masks/core.py`` on numpy), the dense CRFs, the labels, and the atomic PNG write all
happen here, so the main process only schedules and a task carries file paths, not arrays.
This module imports numpy, ``pmm_jax.files.safe_io``, ``pmm_jax.masks.core``/``variants`` and
``pmm_jax.masks.dense_crf``, never JAX: a spawned worker starts in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.files import safe_io
from pmm_jax.masks import core, dense_crf
from pmm_jax.masks.variants import Variant

@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated generator config: the variant's registered name (``method``) and record,
    its background exponent, CVS's ``t`` and ``s``, the official min-max switch, ``num_foreground``
    (number of foreground classes), the CRF parameters and backend."""

    method: str
    variant: Variant
    alpha: float
    t: float
    s: float
    official_minmax: bool
    num_foreground: int
    crf: dense_crf.CRFParams
    backend: str                 # dense_crf.BACKENDS


def host_crfs(image: np.ndarray, label_sets: Sequence[np.ndarray],
              params: dense_crf.CRFParams) -> list[np.ndarray]:
    """pydensecrf, one label set after the other."""
    return [dense_crf.dense_crf(image, probs, params) for probs in label_sets]


# --------------------------------------------------------------------------------------------
# A record: read and check


def load(record, settings: Settings) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """``(image, classes, cams)`` of an ``(id, image or path, cams or path)`` record.

    Classes ascending, 0-based; each CAM float32 ``[H, W]``. A ValueError names the id and the
    file at fault: no image, unreadable file, not a class dict, class index outside
    ``0..num_foreground-1`` or not an integer, CAM size != image size, NaN/inf values.
    """
    image_id, image, cams = record
    cam_source = f" ({cams})" if isinstance(cams, (str, os.PathLike)) else ""
    if image is None:
        raise ValueError(f"{image_id}: CAM{cam_source} has no image")
    image_source = f" ({image})" if isinstance(image, (str, os.PathLike)) else ""
    image = safe_io.read_image(os.fspath(image)) if image_source else np.asarray(image)
    cams = safe_io.read_cams(os.fspath(cams)) if cam_source else cams
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{image_id}: image{image_source} must be uint8 [H, W, 3], "
                         f"got {image.dtype} {image.shape}")
    if not isinstance(cams, Mapping):
        raise ValueError(f"{image_id}: CAMs{cam_source} must be a dict {{class: [H, W]}}")
    shape = image.shape[:2]
    classes = sorted(cams)
    arrays = []
    for c in classes:
        if (isinstance(c, bool) or not isinstance(c, (int, np.integer))
                or not 0 <= c < settings.num_foreground):
            raise ValueError(f"{image_id}: CAM{cam_source} has class index {c!r} outside "
                             f"0..{settings.num_foreground - 1} (num_classes={settings.num_foreground + 1})")
        cam = np.asarray(cams[c], np.float32)
        if cam.shape != shape:
            raise ValueError(f"{image_id}: CAM{cam_source} of class {c} has shape {cam.shape}, "
                             f"image{image_source} is {shape}")
        bad = cam.size - np.count_nonzero(np.isfinite(cam))
        if bad:
            raise ValueError(f"{image_id}: CAM{cam_source} of class {c} has {bad} NaN/inf values")
        arrays.append(cam)
    return image, [int(c) for c in classes], arrays


# --------------------------------------------------------------------------------------------
# One image


def make_mask(image: np.ndarray, classes: Sequence[int], cams: Sequence[np.ndarray],
              settings: Settings) -> np.ndarray:
    """uint8 ``[H, W]`` mask of one image: class c+1, 0 background (rough: 255 unlabelled).

    No class: all background.
    """
    if not classes:
        return np.zeros(image.shape[:2], np.uint8)
    x, probs = core.crf_inputs(np, settings.variant, np.stack(cams), settings.alpha, settings.t,
                               settings.s, settings.official_minmax)
    posterior = np.stack(host_crfs(image, list(probs), settings.crf))
    return lookup(classes)[core.label_indices(np, settings.variant, x, posterior)]


def lookup(classes: Sequence[int]) -> np.ndarray:
    """Mask value of each label index of ``masks.core``: background 0, class c of ``classes``
    c + 1, unlabelled (rough masks) ``IGNORE_LABEL``."""
    return np.asarray([0] + [c + 1 for c in classes] + [IGNORE_LABEL], np.uint8)


def error_text(err: Exception) -> str:
    """The cause of a failed image: the message of an expected error (bad file, bad value),
    else the exception's type and message."""
    if isinstance(err, (ValueError, TypeError, OSError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def run(record, out_path: str, settings: Settings) -> str | None:
    """Makes and writes one record's mask to ``out_path`` (atomically) with pydensecrf; the
    cause of the failure, or None. Any error fails only this image."""
    try:
        image, classes, cams = load(record, settings)
        safe_io.write_mask(out_path, make_mask(image, classes, cams, settings))
    except Exception as err:  # noqa: BLE001 - a bad file, CRF or write fails only its image
        return error_text(err)
    return None


def write(out_path: str, mask: np.ndarray) -> str | None:
    """Writes ``mask`` to ``out_path`` (atomically); the cause of the failure, or None."""
    try:
        safe_io.write_mask(out_path, mask)
    except Exception as err:  # noqa: BLE001 - a failed write fails only its image
        return error_text(err)
    return None
