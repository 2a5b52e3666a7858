"""pmm_jax/segmentation/predict_images.py and the pmm_jax.predict command's refusals.

Predicting with a trained segmenter, end to end, is tests/test_folder_rehearsal.py's."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pmm_jax.constants import PALETTE
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import predict_images

ROOT = pathlib.Path(__file__).resolve().parents[2]


def fake_run(root: pathlib.Path, stages=("seg", "cycle"), seg_miou=None) -> Workdir:
    """A workdir whose stages are marked complete with checkpoint folders for ce, pus, cycle1."""
    wd = Workdir(str(root))
    config = {"seg": {"runs": ["ce", "pus"]}, "cycle": {"num_cycles": 1}}
    safe_io.write_json(wd.config_json, config)
    for stage in stages:
        safe_io.write_json(wd.stage_marker(stage), {})
    for run in ("ce", "pus", "cycle1"):
        os.makedirs(wd.ckpt_dir(f"seg/{run}"))
    if seg_miou is not None:
        safe_io.write_json(wd.results_json, {"seg_miou": seg_miou})
    return wd


def config_of(wd):
    return ml_collections.ConfigDict(safe_io.read_json(wd.config_json))


def test_the_best_run_by_val_miou_is_chosen_unless_one_is_named(tmp_path):
    wd = fake_run(tmp_path, seg_miou={"ce": 0.3, "pus": 0.2, "cycle1": 0.25, "cyclic": 0.25})
    config = config_of(wd)
    assert predict_images.finished_runs(config, wd) == ["ce", "pus", "cycle1"]
    assert predict_images.choose_run(config, wd) == "ce"
    assert predict_images.choose_run(config, wd, "cycle1") == "cycle1"
    with pytest.raises(predict_images.PredictError, match="--run=nope: .*finished: ce, pus, cycle1"):
        predict_images.choose_run(config, wd, "nope")


def test_without_val_the_pus_run_is_chosen(tmp_path):
    wd = fake_run(tmp_path, stages=("seg",), seg_miou={"ce": None, "pus": None})
    assert predict_images.choose_run(config_of(wd), wd) == "pus"


def test_a_workdir_without_a_finished_segmenter_is_refused(tmp_path):
    wd = fake_run(tmp_path, stages=("cls",))
    with pytest.raises(predict_images.PredictError, match="has no finished segmenter"):
        predict_images.choose_run(config_of(wd), wd)


def test_images_are_a_file_or_the_images_of_a_folder(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list(predict_images.image_paths(str(tmp_path))) == ["a", "b"]
    assert predict_images.image_paths(str(tmp_path / "b.png")) == {"b": tmp_path / "b.png"}
    with pytest.raises(predict_images.PredictError, match="neither an image file nor a folder"):
        predict_images.image_paths(str(tmp_path / "missing"))
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(predict_images.PredictError, match="have the same id 'b'"):
        predict_images.image_paths(str(tmp_path))


def test_overlay_blends_the_mask_and_lists_the_classes_present():
    image = np.full((30, 200, 3), 100, np.uint8)
    mask = np.zeros((30, 200), np.uint8)
    mask[:, 100:] = 2
    picture = predict_images.overlay_picture(image, mask, ("background", "rust", "mildew"))
    assert picture.shape == (30 + 2 * 14 + 4, 200, 3)
    np.testing.assert_array_equal(picture[0, 150], np.round(100 * 0.5 + PALETTE[2] * 0.5))
    legend = picture[30:]
    assert (legend == PALETTE[2]).all(axis=-1).any()  # mildew's box
    assert not (legend == PALETTE[1]).all(axis=-1).any()  # rust is absent


def test_the_command_refuses_a_workdir_without_a_segmenter_in_one_paragraph(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    fake_run(tmp_path / "w", stages=())
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.predict", f"--workdir={tmp_path / 'w'}",
         f"--images={tmp_path / 'x.png'}", f"--out_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "has no finished segmenter" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
