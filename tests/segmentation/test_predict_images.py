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


class FakeSegmenter:
    """Stands in for a trained segmenter: every pixel is class ``label``."""

    label = 1

    def __init__(self, config, wd, run, crf=None):
        self.facts = predict_images.dataset_facts(wd)

    def __call__(self, images):
        return [np.full(image.shape[:2], self.label, np.uint8) for image in images]


def predict_setup(tmp_path, monkeypatch, num_images=3):
    """A fake finished run (with dataset.json and checkpoint steps) and a folder of PNGs;
    the segmenter is :class:`FakeSegmenter`. Returns ``(workdir, images folder)``."""
    wd = fake_run(tmp_path / "w")
    config = safe_io.read_json(wd.config_json)
    config["seg"]["num_steps"] = 2
    config["eval"] = {"crf": False, "scales": [1.0], "flip": False}
    safe_io.write_json(wd.config_json, config)
    safe_io.write_json(wd.dataset_json, {"name": "fake", "class_names": ["background", "spot"],
                                    "canvas": [16, 16]})
    for run in ("ce", "pus", "cycle1"):
        os.makedirs(os.path.join(wd.ckpt_dir(f"seg/{run}"), "2"))
        safe_io.write_json(os.path.join(wd.ckpt_dir(f"seg/{run}"), "2", "pmm_digest.json"),
                      {"model/x": {"size": 1, "sha256": run}})
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(num_images):
        Image.fromarray(np.full((5 + i, 7, 3), 40 * i, np.uint8)).save(images / f"p{i}.png")
    monkeypatch.setattr(predict_images, "ImageSegmenter", FakeSegmenter)
    return str(wd.root), images


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(folder).iterdir())}


def test_predict_never_writes_into_the_folder_of_its_images(tmp_path, monkeypatch):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    before = snapshot(images)
    for overlay in (False, True):
        with pytest.raises(predict_images.PredictError, match="is the folder of the images"):
            predict_images.predict_images(workdir, str(images), str(images), overlay=overlay,
                                          progress=False)
        with pytest.raises(predict_images.PredictError, match="is the folder of the images"):
            predict_images.predict_images(workdir, str(images / "p1.png"), str(images),
                                          progress=False)
    assert snapshot(images) == before


def test_a_file_predict_did_not_write_is_never_overwritten(tmp_path, monkeypatch):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1.png").write_bytes((images / "p1.png").read_bytes())  # the user's own file
    for overwrite in (False, True):
        with pytest.raises(predict_images.PredictError,
                           match=r"out/p1.png is in the way .* not written by pmm_jax.predict"):
            predict_images.predict_images(workdir, str(images), str(out), overwrite=overwrite,
                                          progress=False)
    assert snapshot(out) == {"p1.png": (images / "p1.png").read_bytes()}


def test_outputs_record_what_made_them_and_another_segmenter_is_refused_or_redone(
        tmp_path, monkeypatch):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    first = predict_images.predict_images(workdir, str(images), str(out), run="pus",
                                          overlay=True, progress=False)
    assert first == {"run": "pus", "written": 3, "skipped": 0}
    record = predict_images.read_output_record(str(out / "p0.png"))
    assert record["run"] == "pus" and record["step"] == 2 and record["settings"]["crf"] is False
    assert record["image"]["file"] == "p0.png" and "version" in record and record["weights"]
    assert predict_images.read_output_record(str(out / "p0_overlay.jpg")) == record
    again = predict_images.predict_images(workdir, str(images), str(out), run="pus",
                                          overlay=True, progress=False)
    assert again == {"run": "pus", "written": 0, "skipped": 3}
    made = snapshot(out)
    for change in (dict(run="cycle1"), dict(run="pus", crf=True)):
        with pytest.raises(predict_images.PredictError, match="rerun with --overwrite"):
            predict_images.predict_images(workdir, str(images), str(out), progress=False, **change)
        assert snapshot(out) == made
    # Retrained: same run and step, other weights.
    digest = pathlib.Path(Workdir(workdir).ckpt_dir("seg/pus")) / "2" / "pmm_digest.json"
    digest.write_text('{"model/x": {"size": 1, "sha256": "retrained"}}')
    with pytest.raises(predict_images.PredictError, match="weights"):
        predict_images.predict_images(workdir, str(images), str(out), run="pus", progress=False)
    FakeSegmenter.label = 0
    try:
        redone = predict_images.predict_images(workdir, str(images), str(out), run="cycle1",
                                               overwrite=True, progress=False)
    finally:
        FakeSegmenter.label = 1
    assert redone["written"] == 3
    assert predict_images.read_output_record(str(out / "p2.png"))["run"] == "cycle1"
    assert safe_io.read_mask(str(out / "p2.png")).max() == 0


def test_a_changed_image_or_a_cut_output_is_not_taken_as_done(tmp_path, monkeypatch):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    predict_images.predict_images(workdir, str(images), str(out), run="pus", progress=False)
    whole = (out / "p1.png").read_bytes()
    (out / "p1.png").write_bytes(whole[:len(whole) - 20])  # cut short by another program
    (out / "p2.png").unlink()
    result = predict_images.predict_images(workdir, str(images), str(out), run="pus",
                                           progress=False)
    assert result == {"run": "pus", "written": 2, "skipped": 1}
    assert (out / "p1.png").read_bytes() == whole
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(images / "p0.png")
    with pytest.raises(predict_images.PredictError, match="its image changed since"):
        predict_images.predict_images(workdir, str(images), str(out), run="pus", progress=False)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(predict_images.PredictError, match="--out_dir=.* is a file"):
        predict_images.predict_images(workdir, str(images), str(out), progress=False)
    out = tmp_path / "masks"
    bomb = images / "z_bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(predict_images.PredictError, match="z_bomb.png: refused to decode"):
        predict_images.predict_images(workdir, str(images), str(out), progress=False)
    bomb.unlink()
    (images / "album.jpg").mkdir()
    with pytest.raises(predict_images.PredictError, match="album.jpg is a folder"):
        predict_images.predict_images(workdir, str(images), str(out), progress=False)
    (images / "album.jpg").rmdir()
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(predict_images.PredictError, match="gone.jpg is a link to nothing"):
        predict_images.predict_images(workdir, str(images), str(out), progress=False)
    assert not out.exists()


@pytest.mark.parametrize("name", ["config.json", "dataset.json", "results.json"])
@pytest.mark.parametrize("content", ["", '{"seg": {"ru'])
def test_a_cut_or_empty_record_of_the_workdir_is_named(tmp_path, monkeypatch, name, content):
    workdir, images = predict_setup(tmp_path, monkeypatch)
    (pathlib.Path(workdir) / name).write_text(content)
    with pytest.raises(predict_images.PredictError, match=rf"{name} .* empty, cut or damaged"):
        predict_images.predict_images(workdir, str(images), str(tmp_path / "out"),
                                      progress=False)


def test_the_command_names_an_empty_config_json_in_one_paragraph(tmp_path):
    fake_run(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.predict", f"--workdir={tmp_path / 'w'}",
         f"--images={tmp_path}", f"--out_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "config.json" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
