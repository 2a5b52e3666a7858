"""Synthetic colour scenes for the dense-CRF tests (tests/test_dense_crf_jax.py,
tests/test_permutohedral.py): blocky regions of random colours with noise."""

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
