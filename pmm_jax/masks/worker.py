"""One image's mask, from its files to its PNG, in numpy: what a generator worker runs.

``pmm_jax.masks.generator`` hands each image to a worker process (pydensecrf backend) or runs
it in its own process (jax backend, or one worker): read and check the record, normalise the
CAMs, CVS, the CRF inputs, the dense CRFs, the labels, and the atomic PNG write all happen
here, so the main process only schedules and a task carries file paths, not arrays. This
module imports numpy, ``pmm_jax.files.safe_io`` and ``pmm_jax.masks.dense_crf``, never JAX: a
spawned worker starts in a fraction of a second.

The numpy steps transcribe the jitted reference core (``masks/cvs.py``, ``masks/ppmg.py``,
which the tests compare them with) for one unpadded image; float32 as there. Methods
(``METHODS``):

* ``"baseline"``: background ``(1 - max_c x_c) ** alpha``; one joint dense CRF over
  ``[background, present classes]``; argmax (paper 3.1, "CRF" in Table 2).
* ``"crf_cvs"``: the baseline on CVS-smoothed CAMs (Table 2 "CRF & CVS").
* ``"ppmg_no_cvs"``: PPMG with ``x_s = x`` (Table 2 "PPMG w/o CVS").
* ``"ppmg"``: CVS, one binary dense CRF per present class on ``[(1 - x_s) ** alpha, x_s]``,
  ``fg_c = posterior_c > 0.5``, proportion on the UNSMOOTHED ``x``, PPMG argmax (the paper).
* ``"rough"``: the rough masks of PMM's multi-crop training (official ``infer_multi_scale.py
  --out_crf``): on the CAMs as given (no normalisation), background ``(1 - max_c cam_c) **
  alpha`` (alpha 24), one joint CRF; c+1 where class c's posterior exceeds 0.9
  (``multicrop_tiling.ROUGH_MASK_THRESHOLD``), 0 where the background's does, 255 elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import numpy as np

from pmm_jax.files import safe_io
from pmm_jax.masks import dense_crf

# The paper's pseudo-mask variants (Table 2), then the rough masks of multi-crop training.
PSEUDO_MASK_METHODS = ("ppmg", "baseline", "crf_cvs", "ppmg_no_cvs")
METHODS = PSEUDO_MASK_METHODS + ("rough",)
# Variants that smooth the CAMs with CVS before the CRF.
CVS_METHODS = ("ppmg", "crf_cvs")
# Variants that run one joint CRF per image and take its argmax.
JOINT_METHODS = ("baseline", "crf_cvs")
# Background exponent when the config gives none: the paper's 11; rough masks: the official
# crf_threshs default 24.
DEFAULT_ALPHA = {"rough": 24.0}
PAPER_ALPHA = 11.0
# Posterior above which a pixel is foreground in a binary CRF (official: crf_k > 0.5).
FG_THRESHOLD = 0.5
# Rough masks: posterior above which a pixel is labelled (multicrop_tiling.ROUGH_MASK_THRESHOLD;
# not imported, that module is not worker-light), and the value of pixels no label reaches.
ROUGH_THRESHOLD = 0.9
UNLABELLED = 255
# Official epsilons, as in masks/cvs.py: min-max range and CoV mean.
NORM_EPS = 1e-5
COV_EPS = 1e-8

# ``crfs(image, label_sets, params) -> posteriors``: the dense CRFs of one image.
CRFs = Callable[[np.ndarray, Sequence[np.ndarray], dense_crf.CRFParams], Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated generator config (``num_foreground`` = number of foreground classes)."""

    method: str
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
                             f"0..{settings.num_foreground - 1} "
                             f"(num_classes={settings.num_foreground + 1})")
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
# The numpy core (masks/cvs.py and masks/ppmg.py for one unpadded image)


def normalize(cams: np.ndarray, official_minmax: bool = False) -> np.ndarray:
    """``cvs.normalize``: per-class ``(x - min) / (max - min + 1e-5)`` of ``[K, H, W]``."""
    x = np.asarray(cams, np.float32)
    x_min = x.min(axis=(1, 2), keepdims=True)
    x_max = x.max(axis=(1, 2), keepdims=True)
    if official_minmax:
        x = np.where(x < x_min + np.float32(NORM_EPS), np.float32(0), x)
    with np.errstate(over="ignore", invalid="ignore"):
        out = (x - x_min) / (x_max - x_min + np.float32(NORM_EPS))
        # A range that overflows float32 (finite CAM values near +-3e38): the exact 2**-64
        # scaling of cvs.normalize, so such a class is not all 0 (an all-background mask).
        k = np.float32(2.0 ** -64)
        scaled = (x * k - x_min * k) / (x_max * k - x_min * k + np.float32(NORM_EPS) * k)
        return np.where(np.isfinite(x_max - x_min), out, scaled).astype(np.float32)


def cvs(x: np.ndarray, t: float, s: float) -> np.ndarray:
    """``cvs.cvs``: ``where(x < t, 0, x) ** (1 - s * CoV)`` per class, CoV of ``x[x > t]``."""
    out = np.zeros_like(x)
    for k, v in enumerate(x):
        above = v[v > t]
        cov = 0.0
        if above.size:
            mean = above.mean(dtype=np.float32)
            cov = float(np.sqrt(np.mean((above - mean) ** 2)) / (mean + np.float32(COV_EPS)))
        base = np.where(v < t, np.float32(0), v)
        positive = base > 0
        out[k][positive] = base[positive] ** np.float32(1.0 - s * cov)
    return out


def joint_probs(x: np.ndarray, alpha: float) -> np.ndarray:
    """``ppmg.baseline_probs`` without absent classes: ``[(1 - max_c x_c) ** alpha, x...]``."""
    background = (np.float32(1) - x.max(axis=0, keepdims=True)) ** np.float32(alpha)
    return np.concatenate([background, x]).astype(np.float32)


def binary_probs(x_s: np.ndarray, alpha: float) -> list[np.ndarray]:
    """``ppmg.binary_probs``: one ``[(1 - x_s) ** alpha, x_s]`` per class."""
    return [np.stack([(np.float32(1) - v) ** np.float32(alpha), v]) for v in x_s]


def ppmg_labels(x: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """``ppmg.ppmg_labels``: argmax of ``[bg, fg_c * x_c / (1 + sum(x_c * fg_c))]``, 0..K."""
    mass = np.where(fg, x, np.float32(0)).sum(axis=(1, 2), dtype=np.float32)
    scores = fg * (x / (np.float32(1) + mass[:, None, None]))
    background = (~fg.any(axis=0)).astype(np.float32)
    return np.argmax(np.concatenate([background[None], scores]), axis=0)


# --------------------------------------------------------------------------------------------
# One image


def make_mask(image: np.ndarray, classes: Sequence[int], cams: Sequence[np.ndarray],
              settings: Settings, crfs: CRFs = host_crfs) -> np.ndarray:
    """uint8 ``[H, W]`` mask of one image: class c+1, 0 background (rough: 255 unlabelled).

    No class: all background.
    """
    if not classes:
        return np.zeros(image.shape[:2], np.uint8)
    lookup = np.asarray([0] + [c + 1 for c in classes], np.uint8)
    stacked = np.stack(cams)
    if settings.method == "rough":
        (posterior,) = crfs(image, [joint_probs(stacked, settings.alpha)], settings.crf)
        out = np.full(image.shape[:2], UNLABELLED, np.uint8)
        for value, prob in zip(lookup, posterior):
            out[prob > ROUGH_THRESHOLD] = value
        return out
    x = normalize(stacked, settings.official_minmax)
    x_crf = cvs(x, settings.t, settings.s) if settings.method in CVS_METHODS else x
    if settings.method in JOINT_METHODS:
        (posterior,) = crfs(image, [joint_probs(x_crf, settings.alpha)], settings.crf)
        return lookup[np.argmax(posterior, axis=0)]
    posteriors = crfs(image, binary_probs(x_crf, settings.alpha), settings.crf)
    fg = np.stack([p[1] > FG_THRESHOLD for p in posteriors])
    return lookup[ppmg_labels(x, fg)]


def error_text(err: Exception) -> str:
    """The cause of a failed image: the message of an expected error (bad file, bad value),
    else the exception's type and message."""
    if isinstance(err, (ValueError, TypeError, OSError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def run(record, out_path: str, settings: Settings, crfs: CRFs = host_crfs) -> str | None:
    """Makes and writes one record's mask to ``out_path`` (atomically); the cause of the
    failure, or None. Any error fails only this image."""
    try:
        image, classes, cams = load(record, settings)
        safe_io.write_mask(out_path, make_mask(image, classes, cams, settings, crfs))
    except Exception as err:  # noqa: BLE001 - a bad file, CRF or write fails only its image
        return error_text(err)
    return None
