"""Stage ``pseudo`` on a fake VOC tree: the masks are scored on VOC ``train`` (VOC ground
truth), not on the first images of ``train_aug``, and the split and its size are reported."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import configs
from pmm_jax.data.dataset import open_dataset
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import pseudo
from pmm_jax import scoring
from tests.support.voc_tree import SBD_TRAIN, TRAIN_AUG, VOC_TRAIN, build, write_voc_tree



def voc_config(data_dir: str, **pseudo_overrides):
    config = configs.get_config("voc")
    config.data.data_dir = data_dir
    config.pseudo.update(dict(variants=("baseline", "ppmg"), num_workers=1, **pseudo_overrides))
    return config


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """A prepared fake VOC dataset and a workdir with a train CAM for every train_aug image
    (each class's CAM is its ground-truth region, blurred a little)."""
    root = tmp_path_factory.mktemp("pseudo_stage")
    masks = write_voc_tree(root / "manual")
    build(root / "manual", root / "tfds")
    wd = Workdir(str(root / "run"))
    for image_id in TRAIN_AUG:
        mask = masks[image_id]
        present = [int(c) for c in np.unique(mask) if 0 < c < 255]
        safe_io.write_cams(os.path.join(wd.cams("train"), f"{image_id}.npy"),
                      {c - 1: np.clip((mask == c) * 0.9 + 0.05, 0, 1) for c in present})
    return wd, str(root / "tfds"), masks


def test_masks_are_scored_on_voc_train_with_voc_ground_truth(voc_run):
    wd, data_dir, masks = voc_run
    config = voc_config(data_dir)
    metrics = pseudo.run(config, wd, open_dataset(config, wd))
    assert metrics["pseudo_mask_eval"] == {"split": "train", "num_images": len(VOC_TRAIN)}
    # The segmenter's variant covers train_aug; the others only the scored images.
    written = lambda v: sorted(p.stem for p in pathlib.Path(wd.pseudo_masks(v)).glob("*.png"))
    assert written("ppmg") == sorted(TRAIN_AUG)
    assert written("baseline") == sorted(VOC_TRAIN)
    # The score is the mIoU over VOC train ids against their VOC masks: 2007_000002 (also in
    # SBD train, with another mask) is scored against its VOC mask.
    assert "2007_000002" in SBD_TRAIN
    for variant in ("baseline", "ppmg"):
        cm = sum(scoring.confusion_matrix(
            safe_io.read_mask(os.path.join(wd.pseudo_masks(variant), f"{i}.png")), masks[i], 21)
            for i in VOC_TRAIN)
        expected = scoring.iou_from_confusion(cm, rule=config.eval.rule)[1]
        assert metrics["pseudo_mask_miou"][variant] == pytest.approx(float(expected))


def test_eval_subset_keeps_the_first_images_of_the_eval_split(voc_run):
    wd, data_dir, _ = voc_run
    config = voc_config(data_dir, eval_subset=2)
    assert pseudo.eval_ids(config, wd, open_dataset(config, wd)) == list(VOC_TRAIN[:2])


@pytest.mark.parametrize("split,message", [
    ("val", "images have no train CAM"), ("nosuch", "is not a split of voc2012_wsss")])
def test_an_eval_split_outside_train_is_an_error_naming_the_key(voc_run, split, message):
    wd, data_dir, _ = voc_run
    config = voc_config(data_dir, eval_split=split)
    with pytest.raises(ValueError, match=f"config.pseudo.eval_split='{split}'.*") as err:
        pseudo.eval_ids(config, wd, open_dataset(config, wd))
    assert message in str(err.value)


def test_dataset_split_examples_reads_the_named_split(voc_run):
    wd, data_dir, _ = voc_run
    data = open_dataset(voc_config(data_dir), wd)
    assert [ex["id"] for ex in data.dataset_split_examples("train")] == sorted(VOC_TRAIN)
    assert data.ids("train") == sorted(TRAIN_AUG)  # the logical train split: train_aug


def test_an_absent_optional_eval_split_scores_nothing(tmp_path):
    """A folder whose train images have no mask lacks its optional ``train_masked`` split:
    the pseudo-masks are made but not scored (no error, mIoU None)."""
    import types

    import ml_collections

    config = ml_collections.ConfigDict({"pseudo": {"eval_split": "train_masked", "eval_subset": 0}})
    data = types.SimpleNamespace(optional_splits=("train_masked",), dataset_splits=("train",))
    assert pseudo.eval_ids(config, Workdir(str(tmp_path)), data) == []
    with pytest.raises(ValueError, match="config.pseudo.eval_split='train_masked' is not a split"):
        pseudo.eval_ids(config, Workdir(str(tmp_path)), types.SimpleNamespace(
            optional_splits=(), dataset_splits=("train",), name="x"))
