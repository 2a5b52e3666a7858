"""A tiny fake VOCdevkit + SBD tree (the real layout, a handful of ids whose lists overlap as the
real ones do) and the ``voc2012_wsss`` builder prepared from it."""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pmm_jax.data import voc
from pmm_jax.files import safe_io
from tests.support.fake_trees import random_mask, write_jpeg, write_sbd_mat


VOC_TRAIN = ("2007_000001", "2007_000002", "2007_000003")


VOC_VAL = ("2007_000004", "2007_000005")


SBD_TRAIN = ("2008_000010", "2007_000002")  # overlaps VOC train


SBD_VAL = ("2008_000011", "2007_000004")  # overlaps VOC val: must stay out of train_aug


TEST = ("2008_000100",)


TRAIN_AUG = ("2007_000001", "2007_000002", "2007_000003", "2008_000010", "2008_000011")


def image_size(image_id: str) -> tuple[int, int]:
    """A distinct small (height, width) per id, so size mix-ups cannot go unnoticed."""
    n = int(image_id[-3:])
    return 10 + n % 7, 14 + n % 5


def write_voc_tree(root: pathlib.Path, *, sbd: bool = True, test: bool = False) -> dict[str, np.ndarray]:
    """Writes the fake tree under ``root``; returns the mask every train_aug/train/val id must get.

    SBD masks differ from the VOC ones for shared ids (a different seed), so the test sees
    which source an id's mask came from. With ``sbd=False`` a ``SegmentationClassAug``
    folder (greyscale PNGs, as distributed) replaces SBD.
    """
    vocdir = root / "VOCdevkit" / "VOC2012"
    lists = vocdir / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    expected = {}
    for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        for image_id in ids:
            expected[image_id] = random_mask(image_size(image_id), seed=int(image_id[-3:]))
            safe_io.write_mask(str(vocdir / "SegmentationClass" / f"{image_id}.png"),
                               expected[image_id])
    aug_ids = SBD_TRAIN + SBD_VAL
    for image_id in aug_ids:
        mask = random_mask(image_size(image_id), seed=1000 + int(image_id[-3:]))
        expected.setdefault(image_id, mask)
        if sbd:
            write_sbd_mat(root / "benchmark_RELEASE" / "dataset" / "cls" / f"{image_id}.mat", mask)
        else:
            path = root / "SegmentationClassAug" / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(path)
    if sbd:
        for name, ids in (("train", SBD_TRAIN), ("val", SBD_VAL)):
            (root / "benchmark_RELEASE" / "dataset" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    all_ids = set(VOC_TRAIN + VOC_VAL + aug_ids)
    if test:
        (lists / "test.txt").write_text("\n".join(TEST) + "\n")
        all_ids |= set(TEST)
    for image_id in all_ids:
        write_jpeg(vocdir / "JPEGImages" / f"{image_id}.jpg", image_size(image_id), seed=int(image_id[-3:]))
    return expected


def build(manual_dir: pathlib.Path, data_dir: pathlib.Path, **kwargs) -> voc.Voc2012Wsss:
    builder = voc.Voc2012Wsss(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), try_download_gcs=False))
    return builder
