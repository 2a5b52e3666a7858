"""The ``coco2014_wsss`` builder on a tiny fake COCO tree (JPEGs + instances JSONs) written here.

Instances are axis-aligned rectangles: a polygon with integer corners ``(x0, y0, x1, y1)``
rasterises to exactly ``mask[y0:y1, x0:x1]`` (checked below), so the expected semantic masks
are written out by hand and the overlap, crowd and label rules are checked pixel for pixel.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pmm_jax.constants import COCO_CATEGORY_IDS
from pmm_jax.data import builder_base, coco
from tests.support.coco_tree import EXPECTED_LABELS, expected_original, file_id, write_coco_tree
from tests.support.fake_trees import rect

# pycocotools 2.0.x under numpy 2 warns about its own __array__ call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def build(manual_dir, data_dir, config="original", **kwargs) -> coco.Coco2014Wsss:
    builder = coco.Coco2014Wsss(data_dir=str(data_dir), config=config, **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), try_download_gcs=False))
    return builder


def read_split(builder, split: str) -> dict[str, dict]:
    return {ex["id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_tree(root / "manual")
    return root


@pytest.fixture(scope="module")
def original(tree):
    return build(tree / "manual", tree / "tfds", "original")


def test_polygon_rectangles_rasterise_to_slices():
    region = coco.instance_mask(rect(2, 3, 8, 7), 10, 12)
    expected = np.zeros((10, 12), bool)
    expected[3:7, 2:8] = True
    np.testing.assert_array_equal(region, expected)


def test_name_configs_and_counts(original):
    assert original.name == "coco2014_wsss"
    assert [c.name for c in coco.Coco2014Wsss.BUILDER_CONFIGS] == ["original", "contiguous"]
    assert {k: v.num_examples for k, v in original.info.splits.items()} == {"train": 3, "val": 2}
    assert original.info.features["labels"].shape == (80,)


def test_masks_labels_and_images_round_trip(original):
    expected = expected_original()
    examples = {**read_split(original, "train"), **read_split(original, "val")}
    assert sorted(examples) == sorted(expected)
    for number, classes in EXPECTED_LABELS.items():
        ex = examples[file_id(number)]
        np.testing.assert_array_equal(ex["mask"][:, :, 0], expected[file_id(number)])
        labels = np.zeros(80, np.float32)
        labels[[COCO_CATEGORY_IDS.index(c) for c in classes]] = 1
        np.testing.assert_array_equal(ex["labels"], labels)
        assert ex["image"].shape == (*expected[file_id(number)].shape, 3)


def test_greyscale_jpeg_decodes_to_rgb(original):
    ex = read_split(original, "val")[file_id(5)]
    assert ex["image"].shape == (10, 10, 3)
    assert np.array_equal(ex["image"][..., 0], ex["image"][..., 2])


def test_contiguous_config_maps_ids_to_1_to_80(tree, original):
    contiguous = build(tree / "manual", tree / "tfds", "contiguous")
    table = {0: 0, 255: 255, **{c: COCO_CATEGORY_IDS.index(c) + 1 for c in COCO_CATEGORY_IDS}}
    for image_id, ex in read_split(contiguous, "train").items():
        expected = np.vectorize(table.get)(expected_original()[image_id])
        np.testing.assert_array_equal(ex["mask"][:, :, 0], expected)
    assert read_split(contiguous, "train")[file_id(2)]["mask"].max() == 80  # toothbrush


def test_missing_pycocotools_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        coco.instance_mask(rect(0, 0, 1, 1), 2, 2)


def _edit_json(manual: pathlib.Path, split: str, edit) -> None:
    path = manual / "annotations" / f"instances_{split}2014.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_json_size_differing_from_the_image_names_the_id(tmp_path):
    write_coco_tree(tmp_path / "manual")
    _edit_json(tmp_path / "manual", "val", lambda d: d["images"][0].update(height=15))
    with pytest.raises(builder_base.InputError, match=f"{file_id(4)}.*mask size 15x18 differs from image size 14x18"):
        build(tmp_path / "manual", tmp_path / "tfds")


def test_listed_image_without_a_file_names_the_id(tmp_path):
    write_coco_tree(tmp_path / "manual")
    (tmp_path / "manual" / "val2014" / f"{file_id(5)}.jpg").unlink()
    with pytest.raises(builder_base.InputError, match=f"{file_id(5)}.*has no image"):
        build(tmp_path / "manual", tmp_path / "tfds")


def test_wrong_categories_are_rejected(tmp_path):
    write_coco_tree(tmp_path / "manual")
    _edit_json(tmp_path / "manual", "train", lambda d: d["categories"].pop())
    with pytest.raises(builder_base.InputError, match="not the 80 COCO 2014 categories"):
        build(tmp_path / "manual", tmp_path / "tfds")


def test_missing_annotations_folder_shows_tree_and_urls(tmp_path):
    write_coco_tree(tmp_path / "manual")
    shutil.rmtree(tmp_path / "manual" / "annotations")
    with pytest.raises(builder_base.InputError, match=r"(?s)annotations.*instances_val2014\.json.*"
                                              r"annotations_trainval2014\.zip"):
        build(tmp_path / "manual", tmp_path / "tfds")
