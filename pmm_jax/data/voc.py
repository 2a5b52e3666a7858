"""``voc2012_wsss``: PASCAL VOC 2012 segmentation plus the SBD masks, as a tfds builder.

The builder reads only archives the user downloaded and extracted into the *manual dir*
(never the network); ``python -m pmm_jax.data.prepare --dataset=voc`` runs it. Examples have
the features of every dataset here (see ``synthetic.py``): ``id`` (the VOC id, e.g.
``2007_000032``), ``image`` (the original JPEG bytes, decoded to uint8 ``[H, W, 3]``),
``mask`` (uint8 ``[H, W, 1]``: 0 background, 1..20 classes, 255 void) and ``labels``
(float32 ``[20]`` multi-hot). Examples are stored in sorted id order.

Splits (counts on the real data):

* ``train`` (1,464) and ``val`` (1,449): ``ImageSets/Segmentation/{train,val}.txt`` with
  the official ``SegmentationClass`` masks (their 5-px object outlines are 255).
* ``train_aug`` (10,582): the set the WSSS literature trains on, built as
  ``(VOC train | SBD train | SBD val) - VOC val``, i.e. every image with a segmentation
  mask except the VOC val images. The SBD ids come from ``benchmark_RELEASE/dataset/
  {train,val}.txt``, or, when a ``SegmentationClassAug`` folder is given instead of SBD,
  from the names of its PNGs (that folder holds SBD train+val and VOC train+val, 12,031
  masks, so the result is the same 10,582). Masks: an id in VOC ``train`` keeps its
  official VOC mask; every other id takes the SBD mask (``GTcls.Segmentation`` of
  ``cls/<id>.mat``; no void outlines) or ``SegmentationClassAug/<id>.png``. When both SBD
  and ``SegmentationClassAug`` are present, ``SegmentationClassAug`` is used.
* ``test`` (1,456): only when ``ImageSets/Segmentation/test.txt`` exists (the separately
  downloaded test archive). There is no ground truth: the mask is all 255, labels all 0.

Image-level labels are derived from the masks as SEAM/IRN/PMM derive their
``cls_labels.npy``: class ``c`` is present when at least one pixel has value ``c``
(0 and 255 do not count). The input checks are those of every builder here
(``builder_base``), so that the datasets fail on bad input in the same way.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Iterable

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from pmm_jax.constants import IGNORE_LABEL, VOC_CLASSES
from pmm_jax.data.builder_base import (InputError, ManualBuilder, check_mask, features,
                                       labels_from_mask, load_image, png_bytes, read_id_list,
                                       read_png_mask, require_dir)

NUM_CLASSES = len(VOC_CLASSES) - 1

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_TEST_URL = "http://host.robots.ox.ac.uk:8080/ (PASCAL VOC evaluation server, after registering)"
SBD_URL = ("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
           "semantic_contours/benchmark.tgz")
SEGMENTATION_CLASS_AUG_URL = "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip"

EXPECTED_TREE = f"""\
MANUAL_DIR/
  VOCdevkit/VOC2012/                    from VOCtrainval_11-May-2012.tar (1.9 GB)
    JPEGImages/<id>.jpg                 17,125 images
    SegmentationClass/<id>.png          2,913 palette PNG masks
    ImageSets/Segmentation/train.txt    1,464 ids
    ImageSets/Segmentation/val.txt      1,449 ids
    ImageSets/Segmentation/test.txt     optional: 1,456 ids, from VOC2012test.tar (images
                                        land in JPEGImages/)
  benchmark_RELEASE/dataset/            SBD, from benchmark.tgz (1.4 GB)
    cls/<id>.mat                        11,355 masks (GTcls.Segmentation)
    train.txt                           8,498 ids
    val.txt                             2,857 ids
  SegmentationClassAug/<id>.png         alternative to SBD: 12,031 greyscale PNG masks
                                        (may also sit in VOCdevkit/VOC2012/)

Downloads:
  VOC 2012 train/val:   {VOC_URL}
  VOC 2012 test:        {VOC_TEST_URL}
  SBD:                  {SBD_URL}
  SegmentationClassAug: {SEGMENTATION_CLASS_AUG_URL} (community conversion of SBD + VOC)
"""


def train_aug_ids(voc_train: Iterable[str], voc_val: Iterable[str], sbd_ids: Iterable[str]) -> list[str]:
    """``(VOC train | SBD ids) - VOC val``, sorted: the 10,582-image ``train_aug`` list."""
    return sorted((set(voc_train) | set(sbd_ids)) - set(voc_val))


def read_sbd_mask(path: pathlib.Path, image_id: str) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file as ``[H, W]`` uint8."""
    if not path.is_file():
        raise InputError(f"id {image_id!r} has no mask: {path} does not exist")
    try:
        mat = scipy.io.loadmat(path, variable_names=["GTcls"], squeeze_me=True, struct_as_record=False)
        return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)
    except (KeyError, AttributeError, ValueError, TypeError, OSError) as err:
        raise InputError(f"id {image_id!r}: cannot read GTcls.Segmentation from {path}: {err}") from err


class Voc2012Wsss(ManualBuilder):
    """PASCAL VOC 2012 + SBD for weakly-supervised segmentation; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train, val, train_aug, optional test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = EXPECTED_TREE

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features(NUM_CLASSES),
            supervised_keys=None,
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            disable_shuffling=True,  # sorted id order, as synthetic_wsss
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        voc = require_dir(root / "VOCdevkit" / "VOC2012", "VOC 2012 (VOCdevkit/VOC2012)", EXPECTED_TREE)
        require_dir(voc / "JPEGImages", "VOC 2012 images", EXPECTED_TREE)
        require_dir(voc / "SegmentationClass", "VOC 2012 masks", EXPECTED_TREE)
        lists = voc / "ImageSets" / "Segmentation"
        train, val = (read_id_list(lists / f"{name}.txt", EXPECTED_TREE) for name in ("train", "val"))
        aug_ids, aug_mask = self._augmentation(root, voc)

        def voc_mask(image_id):
            return read_png_mask(voc / "SegmentationClass" / f"{image_id}.png", image_id)

        voc_train = set(train)

        def train_aug_mask(image_id):
            return voc_mask(image_id) if image_id in voc_train else aug_mask(image_id)

        splits = {
            "train": self._generate_examples(voc, sorted(train), voc_mask),
            "val": self._generate_examples(voc, sorted(val), voc_mask),
            "train_aug": self._generate_examples(voc, train_aug_ids(train, val, aug_ids), train_aug_mask),
        }
        if (lists / "test.txt").is_file():
            splits["test"] = self._generate_examples(
                voc, sorted(read_id_list(lists / "test.txt", EXPECTED_TREE)), None)
        return splits

    @staticmethod
    def _augmentation(root: pathlib.Path, voc: pathlib.Path):
        """The SBD ids and a mask reader: from ``SegmentationClassAug`` if present, else SBD."""
        for folder in (root / "SegmentationClassAug", voc / "SegmentationClassAug"):
            if folder.is_dir():
                return ([p.stem for p in folder.glob("*.png")],
                        lambda image_id: read_png_mask(folder / f"{image_id}.png", image_id))
        sbd = require_dir(root / "benchmark_RELEASE" / "dataset",
                          "SBD (benchmark_RELEASE/dataset) or a SegmentationClassAug folder", EXPECTED_TREE)
        require_dir(sbd / "cls", "SBD masks (benchmark_RELEASE/dataset/cls)", EXPECTED_TREE)
        ids = [i for name in ("train", "val") for i in read_id_list(sbd / f"{name}.txt", EXPECTED_TREE)]
        return ids, lambda image_id: read_sbd_mask(sbd / "cls" / f"{image_id}.mat", image_id)

    def _generate_examples(self, voc: pathlib.Path, ids: list[str],
                           read_mask: Callable[[str], np.ndarray] | None):
        """Examples of ``ids``; ``read_mask=None`` (test) gives all-void masks."""

        def make_example(image_id: str) -> dict:
            image, size = load_image(voc / "JPEGImages" / f"{image_id}.jpg", image_id)
            mask = np.full(size, IGNORE_LABEL, np.uint8) if read_mask is None else read_mask(image_id)
            check_mask(mask, size, image_id, NUM_CLASSES)
            return {"id": image_id, "image": image, "mask": png_bytes(mask),
                    "labels": labels_from_mask(mask, NUM_CLASSES)}

        return self._examples(ids, make_example)
