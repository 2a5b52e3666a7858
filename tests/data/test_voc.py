"""The ``voc2012_wsss`` builder on a tiny fake VOCdevkit + SBD tree written by the tests.

The tree mimics the real layout with a handful of ids whose lists overlap the way the real
ones do (SBD contains VOC train and VOC val images), so the ``train_aug`` rule, the mask
source of each id, the labels and the void pixels can be checked exactly.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pmm_jax.data import builder_base, voc
from tests.support.voc_tree import (SBD_TRAIN, SBD_VAL, TEST, TRAIN_AUG, VOC_TRAIN, VOC_VAL, build,
                                    image_size, write_voc_tree)


def read_split(builder, split: str) -> dict[str, dict]:
    """``{id: example}`` with the image kept as the stored bytes."""
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {ex["id"].decode(): ex for ex in tfds.as_numpy(ds)}


def expected_labels(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(20, np.float32)
    for value in np.unique(mask):
        if 0 < value < 255:
            labels[value - 1] = 1
    return labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    expected = write_voc_tree(root / "manual", test=True)
    return build(root / "manual", root / "tfds"), expected, root / "manual"


def test_name_and_splits(prepared):
    builder, _, _ = prepared
    assert builder.name == "voc2012_wsss"
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert counts == {"train": 3, "val": 2, "train_aug": 5, "test": 1}


def test_train_aug_rule():
    assert voc.train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN + SBD_VAL) == list(TRAIN_AUG)


@pytest.mark.parametrize("split,ids", [("train", VOC_TRAIN), ("val", VOC_VAL), ("train_aug", TRAIN_AUG)])
def test_masks_labels_and_images_round_trip(prepared, split, ids):
    builder, expected, manual = prepared
    examples = read_split(builder, split)
    assert list(examples) == sorted(ids)  # stored in sorted id order
    for image_id, ex in examples.items():
        np.testing.assert_array_equal(ex["mask"][:, :, 0], expected[image_id])
        np.testing.assert_array_equal(ex["labels"], expected_labels(expected[image_id]))
        jpeg = manual / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
        assert ex["image"] == jpeg.read_bytes()


def test_voc_train_ids_keep_the_voc_mask_and_void(prepared):
    builder, expected, _ = prepared
    ex = read_split(builder, "train_aug")["2007_000002"]  # in VOC train and SBD train
    assert np.array_equal(ex["mask"][:, :, 0], expected["2007_000002"])
    assert (ex["mask"] == 255).any()


def test_images_decode_to_rgb(prepared):
    builder, _, _ = prepared
    ex = next(iter(tfds.as_numpy(builder.as_dataset(split="val"))))
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (*image_size(ex["id"].decode()), 3)


def test_test_split_has_void_masks_and_no_labels(prepared):
    builder, _, _ = prepared
    (ex,) = read_split(builder, "test").values()
    assert ex["mask"].shape == (*image_size(TEST[0]), 1) and (ex["mask"] == 255).all()
    assert not ex["labels"].any()


def test_segmentation_class_aug_gives_the_same_dataset(prepared, tmp_path):
    builder, expected, _ = prepared
    write_voc_tree(tmp_path / "manual", sbd=False)
    aug = build(tmp_path / "manual", tmp_path / "tfds")
    assert set(aug.info.splits) == {"train", "val", "train_aug"}
    examples = read_split(aug, "train_aug")
    assert sorted(examples) == list(TRAIN_AUG)
    for image_id, ex in examples.items():
        np.testing.assert_array_equal(ex["mask"][:, :, 0], expected[image_id])


def test_missing_sbd_and_aug_shows_the_expected_tree(tmp_path):
    write_voc_tree(tmp_path / "manual")
    shutil.rmtree(tmp_path / "manual" / "benchmark_RELEASE")
    with pytest.raises(builder_base.InputError, match=r"(?s)benchmark_RELEASE/dataset.*Expected layout.*"
                                              r"benchmark\.tgz"):
        build(tmp_path / "manual", tmp_path / "tfds")


def test_sbd_id_without_a_mask_names_the_id(tmp_path):
    write_voc_tree(tmp_path / "manual")
    (tmp_path / "manual" / "benchmark_RELEASE" / "dataset" / "cls" / "2008_000011.mat").unlink()
    with pytest.raises(builder_base.InputError, match=r"id '2008_000011' has no mask: .*2008_000011\.mat"):
        build(tmp_path / "manual", tmp_path / "tfds")
