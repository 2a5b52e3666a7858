"""pmm_jax.masks.variants: the declarative records, and a variant registered from outside the
package (``config.plugins``) run through ``python -m pmm_jax.main`` like the built-in ones."""

import os
import shutil
import subprocess
import sys

import pytest

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.masks.variants import VARIANTS, Variant
from tests.support.paths import ROOT

BUILT_IN = ("ppmg", "baseline", "crf_cvs", "ppmg_no_cvs", "rough")
# A module outside the package: PPMG on the CAMs as given (no normalisation), alpha 5.
PLUGIN = """
from pmm_jax.masks.variants import VARIANTS, Variant

VARIANTS.register("toy_raw_ppmg", Variant(smoothing="raw", crf="binary", labels="ppmg", alpha=5.0))
"""


def test_built_in_variants():
    assert VARIANTS.names() == BUILT_IN
    assert VARIANTS.get("ppmg") == Variant(smoothing="cvs", crf="binary", labels="ppmg",
                                           alpha=11.0)
    assert VARIANTS.get("rough").alpha == 24.0


@pytest.mark.parametrize("fields, problem", [
    (dict(smoothing="blur", crf="joint", labels="argmax"), "smoothing 'blur' is not one of"),
    (dict(smoothing="none", crf="joint", labels="ppmg"), "labels 'ppmg' needs crf='binary'"),
    (dict(smoothing="none", crf="binary", labels="argmax", alpha=1.0),
     "labels 'argmax' needs crf='joint'"),
    (dict(smoothing="none", crf="joint", labels="argmax", alpha=0), "alpha 0 must be a positive number"),
])
def test_an_inconsistent_record_is_refused(fields, problem):
    with pytest.raises(ValueError, match=problem):
        Variant(**fields)


def main(tmp_path, *args, timeout=900):
    """``python -m pmm_jax.main`` on the tiny config with the plugin module importable."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "toy_variant_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_misspelt_variant_is_refused_at_start_up_with_the_registered_names(tmp_path):
    proc = main(tmp_path, f"--workdir={tmp_path / 'run'}", "--config.plugins=toy_variant_plugin",
                "--config.pseudo.train_on=toy_raw_ppgm", timeout=300)
    assert proc.returncode == 1
    assert ("config.pseudo.train_on='toy_raw_ppgm' is not a registered pseudo-mask variant "
            "(registered: 'ppmg', 'baseline', 'crf_cvs', 'ppmg_no_cvs', 'rough', 'toy_raw_ppmg')"
            in proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "stages").exists()
    proc = main(tmp_path, f"--workdir={tmp_path / 'run'}", "--config.plugins=toy_variant_plugn",
                timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "config.plugins: cannot import module 'toy_variant_plugn'" in proc.stderr


@pytest.mark.xdist_group("tiny_run")
def test_a_plugin_variant_is_planned_made_scored_and_recorded(tiny_run, tmp_path):
    """The toy variant beside the baseline in a finished tiny run: ``--redo=pseudo`` makes
    its masks of the scored images, scores them and records them in the stage's marker; the
    same command again finds the stage complete."""
    shutil.copytree(tiny_run[0], tmp_path / "run")
    wd = Workdir(str(tmp_path / "run"))
    args = (f"--workdir={wd.root}", "--config.stages=pseudo", "--config.pseudo.num_workers=1",
            "--config.plugins=toy_variant_plugin",
            "--config.pseudo.variants=('toy_raw_ppmg', 'baseline')")
    proc = main(tmp_path, *args, "--redo=pseudo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = safe_io.read_json(wd.stage_marker("pseudo"))
    assert marker["config"]["pseudo.variants"] == ["toy_raw_ppmg", "baseline"]
    assert set(marker["metrics"]["pseudo_mask_miou"]) == {"ppmg", "toy_raw_ppmg", "baseline"}
    assert 0 < marker["metrics"]["pseudo_mask_miou"]["toy_raw_ppmg"] <= 100
    made = len(os.listdir(wd.pseudo_masks("toy_raw_ppmg")))
    assert made == marker["metrics"]["pseudo_mask_eval"]["num_images"] > 0
    assert marker["outputs"][os.path.join("pseudo", "toy_raw_ppmg", "train")] == made
    again = main(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert safe_io.read_json(wd.stage_marker("pseudo"))["id"] == marker["id"]


def test_the_pseudo_masks_command_takes_plugin_variants(tmp_path):
    """``python -m pmm_jax.pseudo_masks --plugins=...`` makes a plugin variant's masks; a
    misspelt ``--method`` is refused listing the registered names."""
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "cams").mkdir()
    yy, xx = np.mgrid[:32, :40]
    disc = (yy - 16) ** 2 + (xx - 20) ** 2 < 81
    image = np.where(disc[..., None], 200, 40).astype(np.uint8).repeat(3, axis=2)
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    safe_io.write_cams(str(tmp_path / "cams" / "a.npy"), {4: disc.astype(np.float32) * 0.9 + 0.05})
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_variant_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), str(ROOT)]))

    def command(method):
        return subprocess.run(
            [sys.executable, "-m", "pmm_jax.pseudo_masks", f"--cam_dir={tmp_path / 'cams'}",
             f"--image_dir={tmp_path / 'images'}", f"--out_dir={tmp_path / 'out'}",
             f"--method={method}", "--num_workers=1", "--plugins=toy_variant_plugin"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = command("toy_raw_ppmg")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mask = safe_io.read_mask(str(tmp_path / "out" / "a.png"))
    assert set(np.unique(mask)) == {0, 5} and mask[16, 20] == 5
    proc = command("toy_raw")
    assert proc.returncode == 1
    assert "unknown pseudo-mask variant 'toy_raw'; registered: 'ppmg', 'baseline', 'crf_cvs', " \
           "'ppmg_no_cvs', 'rough', 'toy_raw_ppmg'" in proc.stderr, proc.stderr[-2000:]
