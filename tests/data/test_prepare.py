"""``python -m pmm_jax.data.prepare``: the command on fake trees, and every bad-input case.

The fake VOC and COCO trees come from ``test_voc.py`` and ``test_coco.py``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pmm_jax.data import prepare
from pmm_jax.files import safe_io
from tests.support.coco_tree import write_coco_tree
from tests.support.voc_tree import VOC_TRAIN, write_voc_tree

# pycocotools 2.0.x under numpy 2 warns about its own __array__ call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run(capsys, *args) -> tuple[int, str, str]:
    status = prepare.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def voc_tree(tmp_path):
    write_voc_tree(tmp_path / "manual")
    return tmp_path


def voc_args(root, *extra):
    return ("--dataset=voc", f"--manual_dir={root / 'manual'}", f"--data_dir={root / 'tfds'}", *extra)


def test_voc_command_reports_splits_and_rerun_is_a_no_op(capsys, voc_tree):
    status, out, _ = run(capsys, *voc_args(voc_tree))
    assert status == 0
    assert f"voc2012_wsss in {voc_tree / 'tfds'}/voc2012_wsss/1.0.0: train 3, train_aug 5, val 2" in out
    (voc_tree / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{VOC_TRAIN[0]}.jpg").unlink()
    assert run(capsys, *voc_args(voc_tree))[0] == 0  # prepared: the manual dir is not read again


def test_coco_command_with_contiguous_config(capsys, tmp_path):
    write_coco_tree(tmp_path / "manual")
    status, out, _ = run(capsys, "--dataset=coco", "--config=contiguous",
                         f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'tfds'}")
    assert status == 0
    assert "coco2014_wsss/contiguous in " in out and ": train 3, val 2" in out


@pytest.mark.parametrize("dataset,url", [
    ("voc", "VOCtrainval_11-May-2012.tar"), ("coco", "images.cocodataset.org/zips/train2014.zip")])
def test_missing_manual_dir_shows_tree_and_downloads(capsys, tmp_path, dataset, url):
    status, _, err = run(capsys, f"--dataset={dataset}", f"--manual_dir={tmp_path / 'nothing'}",
                         f"--data_dir={tmp_path / 'tfds'}")
    assert status == 2
    assert "is not a folder" in err and "Expected layout" in err and "MANUAL_DIR/" in err and url in err


def test_missing_voc_images_folder_shows_tree(capsys, voc_tree):
    images = voc_tree / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    shutil.rmtree(images)
    status, _, err = run(capsys, *voc_args(voc_tree))
    assert status == 2
    assert f"VOC 2012 images not found: {images}" in err and "JPEGImages/<id>.jpg" in err


def _corrupt(voc_tree, image_id, garbage=False):
    """Truncates the JPEG of ``image_id`` to half its bytes, or replaces it with garbage."""
    path = voc_tree / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg" if garbage else data[: len(data) // 2])
    return path


@pytest.mark.parametrize("garbage,reason", [(False, "truncated"), (True, "not a recognised image format")])
def test_corrupt_jpeg_is_an_error_naming_the_file(capsys, voc_tree, garbage, reason):
    path = _corrupt(voc_tree, VOC_TRAIN[1], garbage)
    status, _, err = run(capsys, *voc_args(voc_tree))
    assert status == 2 and f"corrupt image {path}: " in err
    assert reason in err.split(f"corrupt image {path}: ")[1].lower()


def test_skip_corrupt_leaves_the_image_out_and_counts_it(capsys, voc_tree):
    path = _corrupt(voc_tree, VOC_TRAIN[1])  # in train and train_aug
    status, out, _ = run(capsys, *voc_args(voc_tree, "--skip_corrupt"))
    assert status == 0
    assert "train 2, train_aug 4, val 2" in out
    assert f"skipped 1 corrupt image file(s), left out of every split listing them:\n  {path}\n" in out


def test_mask_size_differing_from_the_image_names_the_id(capsys, voc_tree):
    image_id = VOC_TRAIN[2]
    safe_io.write_mask(str(voc_tree / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass" /
                      f"{image_id}.png"), np.zeros((3, 4), np.uint8))
    status, _, err = run(capsys, *voc_args(voc_tree))
    assert status == 2 and f"id '{image_id}': mask size 3x4 differs from image size" in err


def test_listed_id_without_image_is_an_error(capsys, voc_tree):
    lists = voc_tree / "manual" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "val.txt").write_text((lists / "val.txt").read_text() + "2009_999999\n")
    status, _, err = run(capsys, *voc_args(voc_tree))
    assert status == 2 and "id '2009_999999' is listed but has no image" in err


def test_two_preparations_sharing_a_data_dir_run_one_after_the_other(voc_tree, monkeypatch):
    from tests.support.concurrency import overlap_recorder, run_concurrently

    from pmm_jax.data import voc

    state = overlap_recorder(monkeypatch, voc.Voc2012Wsss)
    errors = run_concurrently(lambda: prepare.prepare(
        "voc", str(voc_tree / "manual"), str(voc_tree / "tfds")))
    assert errors == [] and state["most"] == 1


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_empty_manual_dir_is_one_message_not_an_assertion(capsys, tmp_path, dataset):
    (tmp_path / "manual").mkdir()
    status, _, err = run(capsys, f"--dataset={dataset}", f"--manual_dir={tmp_path / 'manual'}",
                         f"--data_dir={tmp_path / 'tfds'}")
    assert status == 2 and err.startswith(f"error: --manual_dir={tmp_path / 'manual'} is empty")
    assert "Expected layout" in err and "Traceback" not in err
