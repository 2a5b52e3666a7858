"""``coco2014_wsss``: MS COCO 2014 instances rendered to semantic masks, as a tfds builder.

Reads only the extracted archives in the manual dir (never the network);
``python -m pmm_jax.data.prepare --dataset=coco`` runs it. Features are those of every
dataset here (see ``synthetic.py``): ``id`` (the file name without ``.jpg``, e.g.
``COCO_train2014_000000000009``), ``image`` (the original JPEG bytes, decoded to uint8
``[H, W, 3]``; greyscale JPEGs decode to RGB), ``mask`` (uint8 ``[H, W, 1]``) and
``labels`` (float32 ``[80]`` multi-hot in the order of ``COCO_CATEGORIES``). Splits:
``train`` (82,783 images of ``train2014``) and ``val`` (40,504 of ``val2014``), every image
of the instance JSON in file-name order, including the ~1 % without any annotation (all
background, no labels).

Configs:

* ``original`` (default): mask values are the original category ids 1..90 (10 of them never
  used), 0 background, 255 void: the format of the COCO masks the WSSS literature shares.
* ``contiguous``: mask values 1..80 are the classes of ``COCO_CLASSES`` (81 classes with
  background), the layout this project's pipeline expects (``num_classes=81``).

Rendering rule, per image: crowd regions (``iscrowd=1``) are painted 255 first; non-crowd
instances are then painted on top from the largest to the smallest (pixel count of the
rendered instance; equal sizes in increasing annotation id). So where instances overlap the
smaller one wins (ties: the later annotation), and an individually annotated object inside
a crowd region keeps its class; only the rest of the crowd region is void.

Labels are the categories of all the image's annotations, crowd ones included (a crowd of
people is evidence of ``person``), so a class whose only pixels are crowd or lie under
smaller instances is labelled although its mask pixels are void or covered.

pycocotools (polygon and RLE rasterisation) is imported only when a split is generated, with
an install hint if it is missing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from pmm_jax.constants import COCO_CATEGORY_IDS, IGNORE_LABEL
from pmm_jax.data.builder_base import (InputError, ManualBuilder, check_mask, check_size,
                                       features, load_image, png_bytes, require_dir)

NUM_CLASSES = len(COCO_CATEGORY_IDS)
SPLITS = {"train": "train2014", "val": "val2014"}

URLS = {
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
}

EXPECTED_TREE = f"""\
MANUAL_DIR/
  train2014/COCO_train2014_<12 digits>.jpg   82,783 images, from train2014.zip (13.5 GB)
  val2014/COCO_val2014_<12 digits>.jpg       40,504 images, from val2014.zip (6.6 GB)
  annotations/instances_train2014.json       from annotations_trainval2014.zip (241 MB)
  annotations/instances_val2014.json

Downloads:
  {URLS["train2014"]}
  {URLS["val2014"]}
  {URLS["annotations"]}
"""


def _mask_utils():
    """``pycocotools.mask``, imported on first use with an install hint if it is missing."""
    try:
        from pycocotools import mask
    except ImportError as err:
        raise ImportError("coco2014_wsss needs pycocotools to rasterise the COCO annotations: "
                          "pip install pycocotools") from err
    return mask


def value_table(contiguous: bool) -> np.ndarray:
    """uint8 ``[91]``: the mask value of each category id (the id itself, or 1..80)."""
    table = np.zeros(max(COCO_CATEGORY_IDS) + 1, np.uint8)
    for index, category_id in enumerate(COCO_CATEGORY_IDS):
        table[category_id] = index + 1 if contiguous else category_id
    return table


def instance_mask(segmentation, height: int, width: int) -> np.ndarray:
    """Boolean ``[H, W]`` of one annotation: polygons, uncompressed or compressed RLE."""
    mask_utils = _mask_utils()
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def render_mask(annotations: list[dict], height: int, width: int, values: np.ndarray) -> np.ndarray:
    """The semantic mask ``[H, W]`` uint8 of one image; see the module docstring's rule."""
    mask = np.zeros((height, width), np.uint8)
    instances = []
    for ann in annotations:
        region = instance_mask(ann["segmentation"], height, width)
        if region.shape != mask.shape:
            raise InputError(f"annotation {ann['id']}: segmentation size {region.shape[0]}x"
                             f"{region.shape[1]} differs from its image's {height}x{width}")
        if ann.get("iscrowd", 0):
            mask[region] = IGNORE_LABEL
        else:
            instances.append((-int(region.sum()), ann["id"], region, values[ann["category_id"]]))
    for _, _, region, value in sorted(instances, key=lambda item: item[:2]):
        mask[region] = value
    return mask


def image_labels(annotations: list[dict]) -> np.ndarray:
    """Multi-hot float32 ``[80]`` over ``COCO_CATEGORY_IDS`` of every annotation, crowd included."""
    labels = np.zeros(NUM_CLASSES, np.float32)
    index = {category_id: i for i, category_id in enumerate(COCO_CATEGORY_IDS)}
    for ann in annotations:
        labels[index[ann["category_id"]]] = 1.0
    return labels


def load_instances(path: pathlib.Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """The image entries (sorted by file name) and annotations by image id of an instances JSON.

    Raises unless the categories are exactly the 80 of ``COCO_CATEGORY_IDS`` and every
    annotation refers to one of them and to a listed image.
    """
    if not path.is_file():
        raise InputError(f"annotation file not found: {path}\n\nExpected layout of the manual dir:\n"
                         f"{EXPECTED_TREE}")
    try:
        data = json.loads(path.read_text())
        categories = sorted(c["id"] for c in data["categories"])
        images, annotations = data["images"], data["annotations"]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a COCO instances file: {err!r}") from err
    if categories != sorted(COCO_CATEGORY_IDS):
        raise InputError(f"{path}: categories {categories} are not the 80 COCO 2014 categories")
    image_ids = {image["id"] for image in images}
    by_image = collections.defaultdict(list)
    for ann in annotations:
        if ann["category_id"] not in COCO_CATEGORY_IDS or ann["image_id"] not in image_ids:
            raise InputError(f"{path}: annotation {ann['id']} has an unknown category "
                             f"{ann['category_id']} or image {ann['image_id']}")
        by_image[ann["image_id"]].append(ann)
    return sorted(images, key=lambda image: image["file_name"]), by_image


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
    """``contiguous``: mask values 1..80 instead of the original category ids."""

    contiguous: bool = False


class Coco2014Wsss(ManualBuilder):
    """COCO 2014 semantic masks and image-level labels for WSSS; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train and val, original and contiguous ids."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_TREE
    BUILDER_CONFIGS = [
        CocoConfig(name="original", description="Mask values: original category ids 0..90, 255 void."),
        CocoConfig(name="contiguous", contiguous=True,
                   description="Mask values: 81 contiguous classes 0..80, 255 void."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features(NUM_CLASSES),
            supervised_keys=None,
            homepage="https://cocodataset.org/",
            disable_shuffling=True,  # file-name order, as synthetic_wsss
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        _mask_utils()
        root = pathlib.Path(dl_manager.manual_dir)
        folders = {split: require_dir(root / folder, f"COCO {folder} images", EXPECTED_TREE)
                   for split, folder in SPLITS.items()}
        require_dir(root / "annotations", "COCO annotations", EXPECTED_TREE)
        return {split: self._generate_examples(folders[split],
                                               root / "annotations" / f"instances_{folder}.json")
                for split, folder in SPLITS.items()}

    def _generate_examples(self, folder: pathlib.Path, annotation_file: pathlib.Path):
        """Examples of one split; the JSON is read only when tfds reaches this split."""
        images, by_image = load_instances(annotation_file)
        entries = {pathlib.Path(image["file_name"]).stem: image for image in images}
        values = value_table(self.builder_config.contiguous)
        max_label = NUM_CLASSES if self.builder_config.contiguous else max(COCO_CATEGORY_IDS)

        def make_example(image_id: str) -> dict:
            entry = entries[image_id]
            image, size = load_image(folder / entry["file_name"], image_id)
            check_size((entry["height"], entry["width"]), size, image_id)
            annotations = by_image.get(entry["id"], [])
            mask = render_mask(annotations, entry["height"], entry["width"], values)
            check_mask(mask, size, image_id, max_label)
            return {"id": image_id, "image": image, "mask": png_bytes(mask),
                    "labels": image_labels(annotations)}

        yield from self._examples(list(entries), make_example)
