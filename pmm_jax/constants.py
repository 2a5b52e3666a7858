"""Shared constants: ignore label, class names and colour palettes.

Every module that needs a class list or a palette imports it from here, so a dataset's
classes are defined exactly once.
"""

import numpy as np

IGNORE_LABEL = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# Synthetic dataset (pmm_jax/data/synthetic.py): index 0 is background.
SYNTHETIC_CLASSES = ("background", "ring", "kite", "comet", "bar", "blob")

CLASS_NAMES = {
    "voc": VOC_CLASSES,
    "synthetic": SYNTHETIC_CLASSES,
}


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map as a ``[num_colors, 3]`` uint8 array.

    Colour ``i`` spreads the bits of ``i`` over the three channels, most significant first;
    255 (the ignore label) comes out as a light cream so boundaries stay visible.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


PALETTE = voc_palette()

# ImageNet statistics used to normalise network inputs (RGB, 0..255 scale).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
