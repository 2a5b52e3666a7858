"""Tests of the command line: clear errors for bad overrides, stages, workdirs and inputs."""

import pathlib
import subprocess
import sys

import pytest

import configs
from pmm_jax import config_rules, main, stages
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from tests.support.commands import run_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (("--config=configs/demo.py:tiny", "--config.cls.num_stpes=3"),
     '--config.cls.num_stpes: the config has no key \'num_stpes\' Did you mean "num_steps"'),
    (("--config=configs/nope.py",),
     "--config=configs/nope.py: cannot load the config (OSError: [Errno 2] No such file"),
    (("--config={bad}",), "cannot load the config (SyntaxError: invalid syntax (bad.py, line 1)"),
    (("--config=configs/demo.py:tiny", "--config.seg.batch_size=0"),
     "error: config.seg.batch_size=0 must be a positive integer"),
])
def test_config_errors_are_one_paragraph(tmp_path, args, message):
    """A misspelt key, a missing or broken config file, a zero batch size: the message names
    the key or file, no traceback, exit status 1."""
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    proc = run_main(*(a.format(bad=bad) for a in args), f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_non_positive_steps_and_batch_sizes_are_refused_by_key():
    config = configs.get_config("demo", "tiny")
    config_rules.check(config)
    for key in ("cls.num_steps", "seg.num_steps", "cam.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        for bad in (0, -2):
            changed = configs.get_config("demo", "tiny")
            changed[section][name] = bad
            with pytest.raises(ValueError, match=rf"config\.{key}={bad} must be a positive"):
                config_rules.check(changed)


def test_an_unknown_dataset_kind_is_refused_by_key():
    config = configs.get_config("demo", "tiny")
    config.data.name = "cityscapes"
    with pytest.raises(ValueError, match=r"config\.data\.name='cityscapes': unknown dataset kind"):
        config_rules.check(config)


def test_negative_intervals_and_subsets_are_refused_by_key():
    """0 turns ``eval_every`` off and means "all" for a subset; a negative value is refused."""
    for key in ("seg.eval_every", "seg.val_subset", "pseudo.eval_subset"):
        section, name = key.split(".")
        changed = configs.get_config("voc", "rehearsal")  # random init allowed
        config_rules.check(changed)
        changed[section][name] = 0
        config_rules.check(changed)
        changed[section][name] = -1
        with pytest.raises(ValueError, match=rf"config\.{key}=-1 must be a non-negative"):
            config_rules.check(changed)


def test_unknown_stage_is_an_error(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path}",
                    "--config.stages=cls,segment")
    assert proc.returncode != 0
    assert "segment" in proc.stderr and "cls,cam,pseudo,seg,cycle,eval" in proc.stderr


def test_every_config_carries_the_crf_backend_and_a_bad_one_is_refused_early():
    """``--config.crf.backend`` exists in every config (they are locked), pydensecrf by default;
    ``config_rules.check`` (run by main) refuses an unknown value by key before any stage runs."""
    for name, args in (("demo", ()), ("demo", ("tiny",)), ("voc", ()), ("coco", ())):
        config = configs.get_config(name, *args)
        assert config.crf.backend == "pydensecrf", name
        config.allow_random_init = True  # voc/coco refuse random weights (tested below)
        config_rules.check(config)
    with config.unlocked():
        config.crf.backend = "JAX"
    with pytest.raises(ValueError,
                       match=r"crf\.backend='JAX'.*allowed values: 'pydensecrf', 'jax'"):
        config_rules.check(config)


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_paper_configs_refuse_random_init_naming_the_keys(name):
    config = configs.get_config(name)
    assert config.allow_random_init is False
    with pytest.raises(ValueError) as err:
        config_rules.check(config)
    message = str(err.value)
    for text in ("config.cls.model.init_from and config.seg.model.init_from are empty",
                 "python -m pmm_jax.convert --arch=resnet38 --src=", "--arch=res2net101",
                 "--config.cls.model.init_from=DIR", "--config.seg.model.init_from=DIR",
                 "see README.md, section 'ImageNet weights'", "--config.allow_random_init=True"):
        assert text.lower() in message.lower(), (text, message)
    config.stages = "cycle"  # cyclic training trains segmenters too
    with pytest.raises(ValueError, match=r"config\.seg\.model\.init_from is empty"):
        config_rules.check(config)
    config.stages = "cam,pseudo,eval"  # trains nothing
    config_rules.check(config)
    config.stages = "cls,seg"
    config.cls.model.init_from, config.seg.model.init_from = "/w/resnet38", "/w/res2net101"
    config_rules.check(config)
    config.seg.model.init_from, config.seg.model.init_from_cls = "", True  # cls's backbone
    config.seg.model.backbone = config.cls.model.backbone.to_dict()  # (which it must build)
    config_rules.check(config)
    config.cls.model.init_from, config.allow_random_init = "", True
    config_rules.check(config)
    for args in ((), ("tiny",)):
        assert configs.get_config("demo", *args).allow_random_init is True


def test_random_init_is_refused_before_any_stage_runs(tmp_path):
    proc = run_main("--config=configs/voc.py", f"--workdir={tmp_path / 'wd'}")
    assert proc.returncode != 0
    assert "config.cls.model.init_from and config.seg.model.init_from" in proc.stderr
    assert not (tmp_path / "wd").exists(), "no stage may have started"


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
                    "--config.allow_random_init=True", timeout=300)
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
def test_the_classifier_killed_in_the_pipeline_ends_as_an_uninterrupted_one(tiny_run, tmp_path):
    """The pipeline's cls stage, SIGKILLed after its step-4 checkpoint and resumed, ends with
    every array of its final checkpoint equal to a run that was never interrupted."""
    from tests.support.interrupted_runs import assert_identical_checkpoints

    from pmm_jax.data import dataset
    from pmm_jax.stages import cls

    workdir = tiny_run[0]
    config = configs.get_config("demo", "tiny")
    config.data.data_dir = str(workdir / "tfds")
    whole = Workdir(str(tmp_path / "whole"))
    cls.run(config, whole, dataset.open_dataset(config, whole))
    assert_identical_checkpoints(Workdir(str(workdir)).ckpt_dir("cls"), whole.ckpt_dir("cls"),
                                 config.cls.num_steps)


@pytest.mark.xdist_group("tiny_run")
def test_results_json_has_every_key(tiny_run):
    workdir = tiny_run[0]
    results = safe_io.read_json(str(workdir / "results.json"))
    assert 0 <= results["cam_miou"] <= 1 and results["cam_bg_threshold"] > 0
    assert set(results["pseudo_mask_miou"]) == {"baseline", "crf_cvs", "ppmg_no_cvs", "ppmg"}
    assert results["pseudo_mask_eval"] == {"split": "train", "num_images": 16}
    assert {"ce", "pus", "cyclic"} <= set(results["seg_miou"])
    assert all(0 <= v <= 1 for v in [*results["pseudo_mask_miou"].values(),
                                      *results["seg_miou"].values()])
    assert set(results["seconds"]) == {"cls", "cam", "pseudo", "seg", "cycle", "eval"}
    # Masks and predictions are palette PNGs with values in 0..C.
    pred = next((workdir / "predictions" / "pus" / "val").glob("*.png"))
    assert safe_io.read_mask(str(pred)).max() < 6


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly the README's second command (the test suite)."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    demo, tests = blocks
    assert "pmm_jax.main --config=configs/demo.py" in demo
    assert tests in (ROOT / ".ci" / "run").read_text()


@pytest.mark.xdist_group("tiny_run")
def test_deleted_cam_and_mask_are_redone_by_rerunning_the_later_stage(tiny_run, tmp_path):
    """A train CAM and its PPMG mask deleted after the run: ``--config.stages=pseudo`` redoes
    the CAM (stage cam is repaired first), then the mask; the markers keep their identity."""
    import shutil

    shutil.copytree(tiny_run[0], tmp_path / "run")
    wd = Workdir(str(tmp_path / "run"))
    cam = sorted(pathlib.Path(wd.cams("train")).glob("*.npy"))[0]
    mask = pathlib.Path(wd.pseudo_masks("ppmg")) / f"{cam.stem}.png"
    cam.unlink()
    mask.unlink()
    before = {n: safe_io.read_json(wd.stage_marker(n)) for n in ("cam", "pseudo")}
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={wd.root}",
                    "--config.stages=pseudo", "--config.pseudo.num_workers=1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage cam: complete but cams/train holds 63 of its 64 files" in proc.stderr
    assert cam.exists() and mask.exists()
    for name, old in before.items():
        new = safe_io.read_json(wd.stage_marker(name))
        assert new["id"] == old["id"] and new["outputs"] == old["outputs"]
        for key in ("cam_miou", "pseudo_mask_miou"):  # the redone files are the same
            assert new["metrics"].get(key) == old["metrics"].get(key)


def test_compilation_cache_setting(tmp_path):
    """``config.compilation_cache``: "" is off, "workdir" caches programs in WORKDIR/xla_cache,
    another value is the folder; an explicit JAX_COMPILATION_CACHE_DIR wins. In a fresh
    process, so this suite's own cache setting is untouched."""
    script = f"""
import os, jax, jax.numpy as jnp
from pmm_jax import main
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
assert main.enable_compilation_cache("", {str(tmp_path)!r}) is None
folder = main.enable_compilation_cache("workdir", {str(tmp_path)!r})
assert folder == os.path.join({str(tmp_path)!r}, "xla_cache"), folder
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
assert os.listdir(folder), "nothing was cached"
os.environ["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"
assert main.enable_compilation_cache("workdir", {str(tmp_path)!r}) is None
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_changed_dataset_is_refused_unless_its_stages_are_redone(tmp_path):
    """WORKDIR/dataset.json records the dataset (a folder's build key); a completed stage made
    from another one (the folder edited since) is refused by name, redoing it is fine."""
    import types

    wd = Workdir(str(tmp_path))
    data = lambda name: types.SimpleNamespace(name=name, class_names=("background", "a"),
                                             canvas=(8, 8))
    main.record_dataset(wd, data("folder_wsss/aaa"), ["cls"], [])
    safe_io.write_json(wd.stage_marker("cls"), {})
    main.record_dataset(wd, data("folder_wsss/aaa"), ["cls", "cam"], [])  # the same: fine
    with pytest.raises(stages.StageError, match=r"stage\(s\) cls made from dataset folder_wsss/aaa"
                                                r", but the dataset is now folder_wsss/bbb.*"
                                                r"--redo=cls"):
        main.record_dataset(wd, data("folder_wsss/bbb"), ["cam"], [])
    main.record_dataset(wd, data("folder_wsss/bbb"), ["cls"], ["cls"])
    assert safe_io.read_json(wd.dataset_json) == {"name": "folder_wsss/bbb",
                                             "class_names": ["background", "a"], "canvas": [8, 8]}
