"""Synthetic colour scenes for the dense-CRF tests (tests/masks/test_dense_crf_jax.py,
tests/masks/test_permutohedral.py): blocky regions of random colours with noise."""

import numpy as np


def synthetic_scene(height, width, seed, num_regions=6):
    """A blocky colour image with noise and its region labels (0..num_regions-1)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((height, width), np.int64)
    image = np.zeros((height, width, 3), np.float32) + rng.uniform(0, 255, 3)
    for region in range(1, num_regions):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        y1, x1 = y0 + rng.integers(8, height // 2), x0 + rng.integers(8, width // 2)
        label[y0:y1, x0:x1] = region
        image[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return image, label


def square_image_and_cam(size=40):
    """A bright square on a dark, slightly noisy background, and a CAM peaking on it."""
    rng = np.random.default_rng(0)
    image = rng.integers(20, 40, (size, size, 3)).astype(np.uint8)
    image[10:30, 12:32] = 220
    yy, xx = np.mgrid[:size, :size]
    cam = np.exp(-(((yy - 20) / 8.0) ** 2 + ((xx - 22) / 8.0) ** 2)).astype(np.float32)
    return image, cam / cam.max()
