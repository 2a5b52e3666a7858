"""The run plan on a finished workdir: refuse changed settings, redo on request, repair missing
outputs, never mark a stage done without them. Runs on a copy of the shared ``tiny_run``."""

import os
import pathlib
import shutil

import pytest
from conftest import load_config

from pmm_jax import stages
from pmm_jax.files import io
from pmm_jax.files.workdir import Workdir

pytestmark = pytest.mark.xdist_group("tiny_run")


@pytest.fixture
def finished(tiny_run, tmp_path):
    """A copy of the finished tiny run's workdir and its config."""
    root = tmp_path / "run"
    shutil.copytree(tiny_run[0], root)
    return Workdir(str(root)), load_config("configs/demo.py", "tiny")


def test_unchanged_or_no_effect_keys_skip_every_stage(finished):
    wd, config = finished
    config.cls.log_every, config.seg.ckpt_every, config.pseudo.num_workers = 1, 1, 2
    config.eval.batch_size, config.stages = 8, "cls,cam"
    assert set(stages.plan(list(stages.ORDER), [], config, wd).values()) == {"skip"}


def test_changed_key_is_refused_naming_it_and_the_redo_list(finished):
    wd, config = finished
    config.pseudo.alpha = 8.0
    before = {n: io.read_json(wd.stage_marker(n)) for n in stages.ORDER}
    with pytest.raises(stages.StaleStageError,
                       match=r"stage\(s\) pseudo, seg, cycle, eval made with other settings.*"
                             r"pseudo.alpha: 11.0 -> 8.0.*--redo=pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), [], config, wd)
    with pytest.raises(stages.StaleStageError, match=r"--redo=pseudo,seg,cycle,eval"):
        stages.plan(list(stages.ORDER), ["pseudo"], config, wd)
    assert stages.plan(list(stages.ORDER), ["pseudo", "seg", "cycle", "eval"], config, wd) == {
        "cls": "skip", "cam": "skip", "pseudo": "redo", "seg": "redo", "cycle": "redo",
        "eval": "redo"}
    assert before == {n: io.read_json(wd.stage_marker(n)) for n in stages.ORDER}


def test_an_upstream_stage_run_again_makes_later_ones_stale(finished):
    wd, config = finished
    with pytest.raises(stages.StaleStageError, match="stage cls runs again before cam"):
        stages.plan(["cls", "cam"], ["cls"], config, wd)
    marker = io.read_json(wd.stage_marker("cls"))
    io.write_json(wd.stage_marker("cls"), {**marker, "id": "another-run"})
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
    io.write_json(stages._started_path(wd, "eval"), {"config": {"eval.flip": False}})
    with pytest.raises(stages.StaleStageError, match=r"eval.flip: False -> True.*--redo=eval"):
        stages.plan(["eval"], [], config, wd)
    assert stages.plan(["eval"], ["eval"], config, wd) == {"eval": "redo"}


def test_redo_deletes_the_stage_outputs_and_records_the_new_run(finished, monkeypatch):
    wd, config = finished
    config.eval.flip = False
    old = io.read_json(wd.stage_marker("eval"))
    first_config = io.read_json(wd.config_json)
    seen = []

    def fake_eval(config, wd, data):
        seen.append(sorted(os.listdir(wd.root)))
        io.write_json(wd.results_json, {"seg_miou": {}})
        return {"seg_miou": {}}

    monkeypatch.setattr(stages, "_runner", lambda name: fake_eval)
    new = stages.run_stage("eval", config, wd, None, "redo")
    assert "predictions" not in seen[0] and "results.json" not in seen[0]
    assert new["config"]["eval.flip"] is False and old["config"]["eval.flip"] is True
    assert new["id"] != old["id"] and new["inputs"] == old["inputs"]
    assert io.read_json(wd.stage_marker("eval")) == new
    assert io.read_json(wd.config_json) == first_config


def test_a_stage_without_its_checkpoint_is_not_marked_complete(finished, monkeypatch):
    wd, config = finished
    shutil.rmtree(wd.ckpt_dir("cls"))
    pathlib.Path(wd.stage_marker("cls")).unlink()
    monkeypatch.setattr(stages, "_runner", lambda name: lambda config, wd, data: {})
    with pytest.raises(stages.StageOutputError, match=r"stage cls finished without its "
                                                      r"outputs \(cls/ckpt has no intact "
                                                      r"checkpoint of step 12"):
        stages.run_stage("cls", config, wd, None, "run")
    assert not pathlib.Path(wd.stage_marker("cls")).exists()
