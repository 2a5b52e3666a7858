"""Tests of the command line: clear errors for bad overrides, stages, workdirs and inputs."""

import os
import pathlib
import subprocess
import sys

import pytest

from pmm_jax import io, main, stages
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


def test_every_config_carries_the_crf_backend_and_a_bad_one_is_refused_early():
    """``--config.crf.backend`` exists in every config (they are locked), pydensecrf by default;
    main's ``check_config`` refuses an unknown value by key before any stage runs."""
    import importlib.util

    for name, args in (("demo", ()), ("demo", ("tiny",)), ("voc", ()), ("coco", ())):
        spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                      ROOT / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*args)
        assert config.crf.backend == "pydensecrf", name
        main.check_config(config)
    with config.unlocked():
        config.crf.backend = "JAX"
    with pytest.raises(ValueError,
                       match=r"crf\.backend='JAX'.*allowed values: 'pydensecrf', 'jax'"):
        main.check_config(config)


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


def test_missing_dataset_prints_only_its_message(tmp_path):
    proc = run_main("--config=configs/voc.py", f"--workdir={tmp_path}", "--config.stages=cls",
                    timeout=300)
    assert proc.returncode != 0
    assert "dataset voc2012_wsss is not prepared" in proc.stderr
    assert "python -m pmm_jax.data.prepare" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2


@pytest.mark.xdist_group("tiny_run")
def test_killed_runs_resume_and_complete(tiny_run):
    """Killed during cls, pseudo and seg, the same command resumes each time and completes."""
    workdir, log, kills = tiny_run
    assert kills == ["cls", "pseudo", "seg"]
    assert "cls: resumed from the checkpoint at step" in log
    assert "seg ce: resumed from the checkpoint at step" in log
    # The pseudo stage kept the masks written before its kill: none is half-written.
    masks = [p for p in (workdir / "pseudo" / "ppmg" / "train").glob("*.png")
             if not p.name.startswith(".")]
    assert len(masks) == 64 and not list(workdir.rglob(".tmp-*"))


@pytest.mark.xdist_group("tiny_run")
def test_results_json_has_every_key(tiny_run):
    workdir = tiny_run[0]
    results = io.read_json(str(workdir / "results.json"))
    assert 0 <= results["cam_miou"] <= 1 and results["cam_bg_threshold"] > 0
    assert set(results["pseudo_mask_miou"]) == {"baseline", "crf_cvs", "ppmg_no_cvs", "ppmg"}
    assert results["pseudo_mask_eval"] == {"split": "train", "num_images": 16}
    assert {"ce", "pus", "cyclic"} <= set(results["seg_miou"])
    assert all(0 <= v <= 1 for v in [*results["pseudo_mask_miou"].values(),
                                      *results["seg_miou"].values()])
    assert set(results["seconds"]) == {"cls", "cam", "pseudo", "seg", "cycle", "eval"}
    # Masks and predictions are palette PNGs with values in 0..C.
    pred = next((workdir / "predictions" / "pus" / "val").glob("*.png"))
    assert io.read_mask(str(pred)).max() < 6


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the README's second command (the test suite)."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    demo, tests = blocks
    assert "pmm_jax.main --config=configs/demo.py" in demo
    assert tests in (ROOT / ".ci" / "run").read_text()
