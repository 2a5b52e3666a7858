"""Pictures of images, CAMs and masks as uint8 RGB arrays (TensorBoard and notebooks).

Colour maps and overlays, and the pictures the stages write to TensorBoard and the notebooks
show: CAM heat maps per class, CVS before/after, a workdir's masks of one image, and
:func:`strip` to put pictures side by side.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
from PIL import Image

from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD, PALETTE
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.masks import core

# Pseudo-mask variants shown side by side: the paper's baseline (CRF) and PPMG.
SHOWN_VARIANTS = ("baseline", "ppmg")


def denormalize(image: np.ndarray) -> np.ndarray:
    """Undoes the ImageNet normalisation of network inputs: float ``[..., 3]`` -> uint8."""
    pixels = np.asarray(image, np.float32) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """A label mask ``[H, W]`` (0..255) as VOC-palette RGB ``[H, W, 3]``."""
    return PALETTE[np.asarray(mask, np.uint8)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """Maps ``[H, W]`` values in [0, 1] to a blue-cyan-yellow-red colour ramp (jet-like)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    anchors = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]],
                       np.float32)
    pos = v * (len(anchors) - 1)
    low = np.clip(np.floor(pos).astype(int), 0, len(anchors) - 2)
    frac = pos - low
    rgb = anchors[low[..., 0]] * (1 - frac) + anchors[low[..., 0] + 1] * frac
    return rgb.astype(np.uint8)


def resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resizes a ``[h, w]`` float map to ``size = (H, W)`` (bilinear, or nearest for labels)."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(np.asarray(array, np.float32), mode="F").resize(
        (size[1], size[0]), resample))


def overlay(image: np.ndarray, colour: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blends an RGB picture over an RGB image."""
    return np.round(image * (1 - weight) + colour * weight).astype(np.uint8)


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """One uint8 image with one ``[h, w]`` CAM (any scale; min-max normalised) as a heat map."""
    cam = resize(cam, image.shape[:2])
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-5)
    return overlay(image, heatmap(cam))


def cam_overlay_batch(images: np.ndarray, cams: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Normalised input images ``[B,H,W,3]`` with the max over present classes of ``cams [B,h,w,C]``."""
    pictures = []
    for image, cam, label in zip(np.asarray(images), np.asarray(cams), np.asarray(labels)):
        present = np.asarray(label) > 0.5
        strongest = np.maximum(cam[..., present], 0).max(-1) if present.any() else np.zeros(cam.shape[:2])
        pictures.append(cam_overlay(denormalize(image), strongest))
    return np.stack(pictures)


def strip(pictures: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Pictures of one height side by side with a white ``gap``: one TensorBoard image."""
    height = max(p.shape[0] for p in pictures)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0)), constant_values=255)
              for p in pictures]
    joined = np.concatenate(padded, axis=1)
    return joined[:, :joined.shape[1] - gap]


def cam_pictures(image: np.ndarray, cams: dict[int, np.ndarray], names) -> dict[str, np.ndarray]:
    """``{class name: image with that class's CAM as a heat map}`` for each class in ``cams``."""
    return {names[c + 1]: cam_overlay(image, cam) for c, cam in sorted(cams.items())}


def cvs_pictures(image: np.ndarray, cams: dict[int, np.ndarray], names, *, t: float, s: float
                 ) -> dict[str, dict[str, np.ndarray]]:
    """CVS before/after per class: ``{class name: {"before": .., "after": ..}}`` heat maps.

    "before" is the min-max normalised CAM ``x``, "after" is ``cvs(x)`` with the run's ``t``
    and ``s`` (paper eq. 6), both drawn on one [0, 1] colour scale so the flattening shows.
    """
    if not cams:
        return {}
    classes = sorted(cams)
    x = core.normalize(np, np.stack([np.asarray(cams[c], np.float32) for c in classes]))
    x_s = core.cvs(np, x, t, s)
    return {names[c + 1]: {"before": overlay(image, heatmap(x[k])),
                           "after": overlay(image, heatmap(x_s[k]))}
            for k, c in enumerate(classes)}


def mask_pictures(workdir: str, image_id: str, gt_mask: np.ndarray | None = None,
                  variants: Iterable[str] = SHOWN_VARIANTS, split: str = "train",
                  runs: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Coloured masks of one image that exist in the workdir.

    Keys: ``pseudo/<variant>`` (train pseudo-masks), ``prediction/<run>`` (segmenter
    predictions of ``split``) and ``ground truth`` when ``gt_mask`` is given. Missing files are
    left out (a variant made only for the eval subset, a run not predicted yet).
    """
    wd = Workdir(workdir)
    paths = {f"pseudo/{v}": os.path.join(wd.pseudo_masks(v, "train"), f"{image_id}.png")
             for v in variants}
    paths.update({f"prediction/{r}": os.path.join(wd.predictions(r, split), f"{image_id}.png")
                  for r in runs})
    out = {name: colorize_mask(safe_io.read_mask(path))
           for name, path in paths.items() if os.path.exists(path)}
    if gt_mask is not None:
        out["ground truth"] = colorize_mask(gt_mask)
    return out
