"""Tests of the command line: clear errors for bad overrides, stages, workdirs and inputs."""

import os
import pathlib
import subprocess
import sys

import pytest

from pmm_jax import main, stages
from pmm_jax.workdir import Workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=120):
    """Runs ``python -m pmm_jax.main`` from the repo root; returns the completed process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "pmm_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_override_key_is_an_error(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
                    "--config.cls.num_stpes=3")
    assert proc.returncode != 0
    assert "num_stpes" in proc.stderr


def test_unknown_stage_is_an_error(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
                    "--config.stages=cls,segment")
    assert proc.returncode != 0
    assert "segment" in proc.stderr and "cls,cam,pseudo,seg,cycle,eval" in proc.stderr


def test_parse_stages_orders_and_deduplicates():
    assert stages.parse_stages("eval, cls,cls") == ["cls", "eval"]
    with pytest.raises(ValueError, match="empty"):
        stages.parse_stages(" , ")


def test_unwritable_workdir_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(main.app.UsageError, match="not writable"):
        main.check_workdir(str(blocker / "run"))


def test_missing_inputs_name_the_stage_to_run_first(tmp_path):
    with pytest.raises(stages.StageInputError, match="stage 'pseudo'.*--config.stages=pseudo,seg"):
        stages.check_inputs("seg", Workdir(str(tmp_path)))
    stages.check_inputs("cls", Workdir(str(tmp_path)))  # the first stage needs nothing


def test_missing_inputs_exit_with_a_message(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
                    "--config.stages=seg")
    assert proc.returncode != 0
    assert "run it first" in proc.stderr and "pseudo" in proc.stderr
