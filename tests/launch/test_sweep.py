"""Tests of launch/sweep.py on fake ``results.json`` files (no pipeline runs)."""

import csv
import importlib.util
import io
import json
import pathlib
import subprocess
import sys

import pytest

import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = load_sweep_module()


def fake_results(alpha: float) -> dict:
    return {"dataset": "synthetic_wsss/demo", "cam_miou": 0.4, "cam_bg_threshold": 0.15,
            "pseudo_mask_miou": {"baseline": 0.5, "ppmg": 0.5 + alpha / 100},
            "seg_miou": {"ce": 0.55, "pus": 0.6}, "seconds": {"cls": 10.0}}


def test_run_name_is_short_sorted_and_filesystem_safe():
    assert sweep.run_name({"seed": 1, "pseudo.alpha": 8.0}) == "alpha-8.0_seed-1"
    assert sweep.run_name({"data.name": "synthetic_wsss/demo"}) == "name-synthetic_wsss-demo"
    assert sweep.run_name({"cam.scales": (1.0, 1.5)}) == "scales-(1.0,1.5)"
    assert sweep.run_name({}) == "default"


def test_command_has_overrides_and_extra_flags():
    cmd = sweep.command("configs/demo.py:tiny", "/r/alpha-8.0", {"pseudo.alpha": 8.0},
                        ["--config.seed=1"])
    assert cmd[1:] == ["-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
                       "--workdir=/r/alpha-8.0", "--config.pseudo.alpha=8.0", "--config.seed=1"]


def test_load_sweep_reads_get_sweep_next_to_the_config():
    runs = sweep.load_sweep(str(ROOT / "configs" / "demo.py") + ":tiny", "alpha")
    assert runs == [{"pseudo.alpha": 8.0}, {"pseudo.alpha": 11.0}]


def test_collect_marks_missing_results(tmp_path):
    runs = {sweep.run_name(o): o for o in ({"pseudo.alpha": 8.0}, {"pseudo.alpha": 11.0})}
    (tmp_path / "alpha-8.0").mkdir()
    (tmp_path / "alpha-8.0" / "results.json").write_text(json.dumps(fake_results(8.0)))
    rows = sweep.collect(str(tmp_path), runs)
    assert rows[0]["run"] == "alpha-8.0" and rows[0]["override.pseudo.alpha"] == 8.0
    assert rows[0]["pseudo_mask_miou.ppmg"] == pytest.approx(0.58)
    assert rows[1] == {"run": "alpha-11.0", "override.pseudo.alpha": 11.0,
                       "status": "no results.json"}


def test_csv_has_every_column_and_markdown_the_headline_ones(tmp_path):
    rows = [{"run": "a", "override.x": 1, "cam_miou": 0.41234, "seconds.cls": 3.0},
            {"run": "b", "override.x": 2, "status": "no results.json"}]
    parsed = list(csv.DictReader(io.StringIO(sweep.to_csv(rows))))
    assert parsed[0] == {"run": "a", "override.x": "1", "cam_miou": "0.41234",
                         "seconds.cls": "3.0", "status": ""}
    assert parsed[1]["status"] == "no results.json"
    table = sweep.to_markdown(rows).splitlines()
    assert table[0] == "| run | override.x | cam_miou | status |"
    assert table[2] == "| a | 1 | 0.4123 |  |"
    assert table[3] == "| b | 2 |  | no results.json |"


def run_script(*args):
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_print_only_prints_one_command_per_run_and_runs_nothing(tmp_path):
    proc = run_script("--config=configs/demo.py:tiny", "--sweep=alpha", f"--root={tmp_path}",
                      "--print_only", "--extra=--config.seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert f"--workdir={tmp_path}/alpha-8.0" in lines[0] and "--config.pseudo.alpha=8.0" in lines[0]
    assert all(line.endswith("--config.seed=3") for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_collect_only_writes_the_combined_table(tmp_path):
    for alpha in (8.0, 11.0):
        run_dir = tmp_path / f"alpha-{alpha}"
        run_dir.mkdir()
        (run_dir / "results.json").write_text(json.dumps(fake_results(alpha)))
    proc = run_script("--config=configs/demo.py", "--sweep=alpha", f"--root={tmp_path}",
                      "--collect_only")
    assert proc.returncode == 0, proc.stderr
    markdown = (tmp_path / "sweep.md").read_text()
    assert "| alpha-8.0 | 8.0000 | 0.4000 | 0.5000 | 0.5800 | 0.5500 | 0.6000 |" in markdown
    assert "| alpha-11.0 | 11.0000 |" in markdown and markdown in proc.stdout
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["run"] for r in rows] == ["alpha-8.0", "alpha-11.0"]
    assert rows[1]["seconds.cls"] == "10.0"


def test_unknown_sweep_is_an_error(tmp_path):
    proc = run_script("--config=configs/demo.py", "--sweep=nope", f"--root={tmp_path}",
                      "--print_only")
    assert proc.returncode != 0 and "unknown sweep" in proc.stderr


@pytest.mark.parametrize("config_file", ["demo.py", "voc.py", "coco.py"])
def test_every_sweep_overrides_existing_config_keys(config_file):
    """Each sweep of each config names keys its locked config has, with values of their type,
    so no run of a sweep fails on a typo after the others spent their time."""
    path = ROOT / "configs" / config_file
    config = configs.get_config(path.stem)
    config.lock()
    names = {"demo.py": ("alpha", "cvs_s", "pus", "seed"),
             "voc.py": ("alpha", "cvs_s", "pus_mode", "pus"),
             "coco.py": ("alpha", "cvs_s", "pus_mode", "pus")}[config_file]
    for name in names:
        runs = sweep.load_sweep(str(path), name)
        assert len(runs) >= 2
        for overrides in runs:
            for key, value in overrides.items():
                trial = config.copy_and_resolve_references()
                node = trial
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node[part]
                node[leaf] = value  # a locked config raises on an unknown key or a bad type
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep.load_sweep(str(path), "no_such_sweep")
