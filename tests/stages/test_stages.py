"""The run plan on a finished workdir: refuse changed settings, redo on request, repair missing
outputs, never mark a stage done without them. Runs on a copy of the shared ``tiny_run``."""

import dataclasses
import os
import pathlib
import shutil

import pytest

import configs
from pmm_jax import stages
from pmm_jax.stages import planner
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir

def run_instead(monkeypatch, run):
    """Every stage's declaration with ``run`` as its run function, for the planner."""
    real = planner.declared
    monkeypatch.setattr(planner, "declared",
                        lambda name: dataclasses.replace(real(name), run=run))

pytestmark = pytest.mark.xdist_group("tiny_run")


@pytest.fixture
def finished(tiny_run, tmp_path):
    """A copy of the finished tiny run's workdir and its config."""
    root = tmp_path / "run"
    shutil.copytree(tiny_run[0], root)
    return Workdir(str(root)), configs.get_config("demo", "tiny")


def test_unchanged_or_no_effect_keys_skip_every_stage(finished):
    wd, config = finished
    config.cls.log_every, config.seg.ckpt_every, config.pseudo.num_workers = 1, 1, 2
    config.eval.batch_size, config.stages = 8, "cls,cam"
    assert set(stages.plan(list(stages.ORDER), [], config, wd).values()) == {"skip"}


def test_changed_key_is_refused_naming_it_and_the_redo_list(finished):
    wd, config = finished
    config.pseudo.alpha = 8.0
    before = {n: safe_io.read_json(wd.stage_marker(n)) for n in stages.ORDER}
    with pytest.raises(stages.StaleStageError,
                       match=r"stage\(s\) pseudo, seg, cycle, eval made with other settings.*"
                             r"pseudo.alpha: 11.0 -> 8.0.*--redo=pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), [], config, wd)
    with pytest.raises(stages.StaleStageError, match=r"--redo=pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), ["pseudo"], config, wd)
    assert stages.plan(list(stages.ORDER), ["pseudo", "seg", "cycle", "eval"], config, wd) == {
        "cls": "skip", "cam": "skip", "pseudo": "redo", "seg": "redo", "cycle": "redo",
        "eval": "redo"}
    assert before == {n: safe_io.read_json(wd.stage_marker(n)) for n in stages.ORDER}


def test_an_upstream_stage_run_again_makes_later_ones_stale(finished):
    wd, config = finished
    with pytest.raises(stages.StaleStageError, match="stage cls runs again before cam"):
        stages.plan(["cls", "cam"], ["cls"], config, wd)
    marker = safe_io.read_json(wd.stage_marker("cls"))
    safe_io.write_json(wd.stage_marker("cls"), {**marker, "id": "another-run"})
    with pytest.raises(stages.StaleStageError, match="stage cls was redone after cam.*--redo=cam"):
        stages.plan(["cam"], [], config, wd)


def test_missing_outputs_are_repaired_and_upstream_ones_too(finished):
    wd, config = finished
    cams = sorted(pathlib.Path(wd.cams("train")).glob("*.npy"))
    cams[0].unlink()
    (pathlib.Path(wd.pseudo_masks("ppmg")) / f"{cams[0].stem}.png").unlink()
    assert stages.plan(["pseudo"], [], config, wd) == {"cam": "repair", "pseudo": "repair"}
    assert stages.plan(["seg"], [], config, wd) == {"seg": "skip"}, "complete: inputs unread"
    pathlib.Path(wd.stage_marker("seg")).unlink()
    assert stages.plan(["seg"], [], config, wd) == {"cam": "repair", "pseudo": "repair",
                                                    "seg": "run"}


def test_half_done_stage_with_other_settings_is_refused(finished):
    wd, config = finished
    pathlib.Path(wd.stage_marker("eval")).unlink()
    safe_io.write_json(planner._started_path(wd, "eval"), {"config": {"eval.flip": False}})
    with pytest.raises(stages.StaleStageError, match=r"eval.flip: False -> True.*--redo=eval"):
        stages.plan(["eval"], [], config, wd)
    assert stages.plan(["eval"], ["eval"], config, wd) == {"eval": "redo"}


def test_redo_deletes_the_stage_outputs_and_records_the_new_run(finished, monkeypatch):
    wd, config = finished
    config.eval.flip = False
    old = safe_io.read_json(wd.stage_marker("eval"))
    first_config = safe_io.read_json(wd.config_json)
    seen = []

    def fake_eval(config, wd, data):
        seen.append(sorted(os.listdir(wd.root)))
        safe_io.write_json(wd.results_json, {"seg_miou": {}})
        return {"seg_miou": {}}

    run_instead(monkeypatch, fake_eval)
    new = stages.run_stage("eval", config, wd, None, "redo")
    assert "predictions" not in seen[0] and "results.json" not in seen[0]
    assert new["config"]["eval.flip"] is False and old["config"]["eval.flip"] is True
    assert new["id"] != old["id"] and new["inputs"] == old["inputs"]
    assert safe_io.read_json(wd.stage_marker("eval")) == new
    assert safe_io.read_json(wd.config_json) == first_config


def test_a_stage_without_its_checkpoint_is_not_marked_complete(finished, monkeypatch):
    wd, config = finished
    shutil.rmtree(wd.ckpt_dir("cls"))
    pathlib.Path(wd.stage_marker("cls")).unlink()
    run_instead(monkeypatch, lambda config, wd, data: {})
    with pytest.raises(stages.StageOutputError, match=r"stage cls finished without its "
                                                      r"outputs \(cls/ckpt has no intact "
                                                      r"checkpoint of step 12"):
        stages.run_stage("cls", config, wd, None, "run")
    assert not pathlib.Path(wd.stage_marker("cls")).exists()


def flip_bytes(ckpt_step: pathlib.Path) -> None:
    """Damages a checkpoint step: 64 flipped bytes in its largest model file."""
    data = max((p for p in (ckpt_step / "model").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])
    data.write_bytes(bytes(raw))


def test_a_damaged_final_checkpoint_is_retrained_and_everything_made_from_it_is_stale(finished):
    """cls's final step 12 damaged: cls retrains from step 8 as a new model, so every stage
    made from the old one must be redone (named), including the segmenters that started
    from the cls backbone (init_from_cls) and the eval of the cyclic segmenter."""
    wd, config = finished
    flip_bytes(pathlib.Path(wd.ckpt_dir("cls")) / "12")
    assert stages.plan(["cls"], [], config, wd) == {"cls": "retrain"}
    with pytest.raises(stages.StaleStageError,
                       match=r"stage cls runs again before cam \(its final checkpoint is damaged"
                             r".*--redo=cam,pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), [], config, wd)
    # A stage that reads cls pulls in its retraining, through init_from_cls too.
    assert stages.plan(["cam"], ["cam"], config, wd) == {"cls": "retrain", "cam": "redo"}
    assert stages.plan(["seg"], ["seg"], config, wd) == {"cls": "retrain", "seg": "redo"}


def test_eval_retrains_a_damaged_cyclic_segmenter_first(finished):
    wd, config = finished
    ckpt = pathlib.Path(wd.ckpt_dir("seg/cycle1"))
    flip_bytes(ckpt / max((p.name for p in ckpt.iterdir() if p.name.isdigit()), key=int))
    assert stages.plan(["eval"], ["eval"], config, wd) == {"cycle": "retrain", "eval": "redo"}


@pytest.mark.parametrize("content", ["", "{\"outputs\": {", "[1, 2]", "\"done\""])
def test_a_damaged_marker_is_one_paragraph_naming_it_and_the_redo(finished, content):
    wd, config = finished
    pathlib.Path(wd.stage_marker("cam")).write_text(content)
    with pytest.raises(stages.StageError, match=rf"the stage marker {wd.stage_marker('cam')} "
                                                r"(is not readable JSON|holds a (list|str)).*"
                                                r"Rerun with --redo=cam"):
        stages.plan(list(stages.ORDER), [], config, wd)
    with pytest.raises(stages.StaleStageError, match=r"--redo=cam,pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), ["cam"], config, wd)  # later stages came from the old one


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_cam_met_by_the_pseudo_stage_names_the_file_its_stage_and_the_redo(
        finished, monkeypatch):
    """The generator's error for a truncated CAM file (one failed image among the others)
    becomes one paragraph: the file, stage cam, and the --redo of cam and everything after."""
    from pmm_jax.masks import generator

    wd, config = finished
    cam = sorted(pathlib.Path(wd.cams("train")).glob("*.npy"))[3]
    truncate(cam)
    with pytest.raises(ValueError) as read_error:
        safe_io.read_cams(str(cam))
    failure = generator.PseudoMaskError([(cam.stem, str(read_error.value))], {})

    def pseudo_stage(config, wd, data):
        raise failure

    run_instead(monkeypatch, pseudo_stage)
    with pytest.raises(stages.DamagedInputError) as err:
        stages.run_stage("pseudo", config, wd, None, "redo")
    message = str(err.value)
    assert f"stage pseudo cannot use {cam}, written by stage 'cam'" in message
    assert ("--config.stages=cls,cam,pseudo,seg,cycle,eval --redo=cam,pseudo,seg,cycle,eval"
            in message)
    assert "\n" not in message


def test_a_truncated_pseudo_mask_read_through_tensorflow_names_the_file(finished):
    """The same for a pseudo-mask PNG that the segmenter's tf.data pipeline fails to read: the
    TensorFlow error (which carries Python's message and traceback) becomes one paragraph."""
    import itertools

    import tensorflow as tf

    from pmm_jax.data import pipeline

    wd, config = finished
    masks = pathlib.Path(wd.pseudo_masks("ppmg"))
    truncate(masks / "train_000005.png")
    ds = pipeline.with_masks_from_dir(
        pipeline.load_split(config.data.name, "train", wd.data_dir(), decode=False), str(masks),
        producer="the 'pseudo' stage")
    with pytest.raises(tf.errors.OpError) as tf_error:
        list(itertools.islice(pipeline.train_batches(ds, batch_size=16, crop_size=32, seed=0,
                                                     num_foreground=5), 4))
    damaged = stages.damaged_input(tf_error.value, "seg", config, wd)
    assert damaged is not None, str(tf_error.value)[:500]
    message = str(damaged)
    mask = masks / "train_000005.png"
    assert f"stage seg cannot use {mask}, written by stage 'pseudo'" in message
    assert "--redo=pseudo,seg,cycle,eval" in message and "\n" not in message
    assert stages.damaged_input(ValueError("no path here"), "seg", config, wd) is None


def test_a_failing_stage_ends_the_process_promptly_with_one_paragraph(finished):
    """A truncated pseudo-mask met by `--config.stages=seg --redo=seg`: exit status 1 within a
    bounded time (no tf.data prefetch thread, checkpoint writer or pool keeps the process
    alive after its message), one paragraph naming the file."""
    import subprocess
    import sys
    import time

    wd, _ = finished
    mask = pathlib.Path(wd.pseudo_masks("ppmg")) / "train_000005.png"
    truncate(mask)
    root = pathlib.Path(__file__).resolve().parents[2]
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
         f"--workdir={wd.root}", "--config.stages=seg", "--redo=seg"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 240
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot use {mask}, written by stage 'pseudo'" in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
