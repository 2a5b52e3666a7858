"""A tiny fake COCO tree (JPEGs + instances JSONs) whose instances are axis-aligned rectangles,
with the semantic masks and labels the builder must make of it, written out by hand."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

from pmm_jax.constants import COCO_CATEGORIES
from tests.support.fake_trees import crowd_region, rect


PERSON, BUS, CAT, DOG, TOOTHBRUSH = 1, 6, 17, 18, 90


# (split, numeric id, height, width, greyscale, annotations (ann id, category, segmentation, crowd))
IMAGES = [
    ("train", 1, 20, 30, False, [(10, PERSON, rect(0, 0, 20, 15), 0),
                                 (11, DOG, rect(10, 5, 25, 12), 0),
                                 (12, PERSON, crowd_region((20, 30), slice(14, 20), slice(0, 30)), 1)]),
    ("train", 2, 16, 16, False, [(20, TOOTHBRUSH, rect(0, 0, 8, 8), 0),
                                 (21, CAT, rect(4, 4, 12, 12), 0)]),
    ("train", 3, 12, 10, False, []),
    ("val", 4, 14, 18, False, [(40, CAT, crowd_region((14, 18), slice(2, 6), slice(3, 9)), 1)]),
    ("val", 5, 10, 10, True, [(50, BUS, rect(0, 0, 10, 10), 0)]),
]


def expected_original() -> dict[str, np.ndarray]:
    """The masks the documented rule must give, written out by hand (original ids)."""
    m1 = np.zeros((20, 30), np.uint8)
    m1[14:20, :] = 255  # crowd ...
    m1[0:15, 0:20] = PERSON  # ... except where an instance lies
    m1[5:12, 10:25] = DOG  # smaller than the person: wins the overlap
    m2 = np.zeros((16, 16), np.uint8)
    m2[0:8, 0:8] = TOOTHBRUSH
    m2[4:12, 4:12] = CAT  # same size: the later annotation wins
    m4 = np.zeros((14, 18), np.uint8)
    m4[2:6, 3:9] = 255
    return {file_id(1): m1, file_id(2): m2, file_id(3): np.zeros((12, 10), np.uint8),
            file_id(4): m4, file_id(5): np.full((10, 10), BUS, np.uint8)}


EXPECTED_LABELS = {1: (PERSON, DOG), 2: (TOOTHBRUSH, CAT), 3: (), 4: (CAT,), 5: (BUS,)}


def file_id(number: int) -> str:
    split = "train" if number <= 3 else "val"
    return f"COCO_{split}2014_{number:012d}"


def write_coco_tree(root: pathlib.Path) -> None:
    """JPEGs in train2014/ and val2014/, and the two instances JSONs with all 80 categories."""
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": name, "supercategory": "x"} for i, name in COCO_CATEGORIES]
    for split in ("train", "val"):
        images, annotations = [], []
        for image_split, number, height, width, grey, anns in IMAGES:
            if image_split != split:
                continue
            name = f"{file_id(number)}.jpg"
            images.append({"id": number, "file_name": name, "height": height, "width": width})
            pixels = np.random.default_rng(number).integers(0, 256, (height, width, 3), np.uint8)
            image = Image.fromarray(pixels).convert("L") if grey else Image.fromarray(pixels)
            (root / f"{split}2014").mkdir(exist_ok=True)
            image.save(root / f"{split}2014" / name, format="JPEG")
            annotations += [{"id": ann_id, "image_id": number, "category_id": category,
                             "segmentation": segmentation, "iscrowd": crowd, "area": 1.0,
                             "bbox": [0, 0, 1, 1]} for ann_id, category, segmentation, crowd in anns]
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
