"""Pictures of images, CAMs and masks as uint8 RGB arrays (TensorBoard and notebooks)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD, PALETTE


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
