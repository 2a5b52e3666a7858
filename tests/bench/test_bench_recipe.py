"""bench/recipe.py (with bench/units.py): the projection table's rows and arithmetic, and a smallest-settings run in a
subprocess where TensorFlow, clu and pydensecrf cannot be imported (as on a bare GPU machine)."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # bench/ is not installed
from bench import recipe, units  # noqa: E402

STAGES = ["cls", "cam", "pseudo", "seg", "seg val", "cycle masks", "eval", "**total**"]


def rows_of(lines):
    """``{stage: [cells]}`` of the Markdown table in ``lines``."""
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip().strip("|").split("|")] for line in lines
             if line.startswith("| ") and not line.startswith("| stage") and "---" not in line)}


def test_counts_follow_the_configs():
    voc, coco = recipe.counts(recipe.load_config("voc")), recipe.counts(recipe.load_config("coco"))
    assert voc["cls_steps"] == 20 * 10582 // 16 and coco["cls_steps"] == 20 * 82783 // 8
    assert voc["cam_images"] == 10582 + 1449 and coco["cam_images"] == 82783 + 40504
    # the three other variants are made for the scored images: VOC train, all of COCO train
    assert voc["pseudo_images"] == 10582 + 3 * 1464 and coco["pseudo_images"] == 82783 + 3 * 82783
    assert voc["segmenters"] == 2 and coco["segmenters"] == 1  # PUS + one cycle; COCO no cycle
    assert voc["seg_steps"] == 2 * 20000 and coco["seg_steps"] == 40000
    assert voc["seg_val_images"] == 10 * 1449 * 2 and coco["seg_val_images"] == 10 * 40504
    assert voc["cycle_images"] == 10582 and coco["cycle_images"] == 0
    assert voc["eval_images"] == 2 * 1449 and coco["eval_images"] == 40504
    subset = recipe.load_config("coco")
    subset.seg.val_subset = 5000  # the in-training validation on the first 5,000 val images
    assert recipe.counts(subset)["seg_val_images"] == 10 * 5000
    assert recipe.counts(subset)["eval_images"] == 40504


def test_table_projects_hours_from_seconds_per_unit():
    config = recipe.load_config("coco")
    t = {"cls_step": 0.5, "cam_image": 2.0, "seg_step": 1.0, "seg_batch": 16,
         "pseudo_image/pydensecrf": 0.8, "pseudo_image/jax": 0.1,
         "test_image/pydensecrf": 0.3, "test_image/jax": 0.2}
    rows = rows_of(recipe.table("coco", config, t, ["pydensecrf", "jax"], cores=4))
    assert list(rows) == STAGES
    n = recipe.counts(config)
    hours = lambda stage: [float(h.strip("*")) for h in rows[stage][-2:]]  # noqa: E731
    assert hours("cls") == pytest.approx([round(0.5 * n["cls_steps"] / 3600, 2)] * 2)
    # pydensecrf pseudo-masks over a pool of every core, the jax CRF in one process
    assert hours("pseudo") == pytest.approx([round(0.8 * n["pseudo_images"] / 4 / 3600, 2),
                                             round(0.1 * n["pseudo_images"] / 3600, 2)])
    # COCO's batch 64 from a step timed at 16: four times the step
    assert rows["seg"][2] == "4.000" and hours("seg")[1] == pytest.approx(
        round(4.0 * n["seg_steps"] / 3600, 2))
    assert hours("cycle masks") == [0.0, 0.0]
    total = [sum(hours(s)[i] for s in STAGES[:-1]) for i in (0, 1)]
    assert hours("**total**") == pytest.approx(total, abs=0.1)


def test_smallest_run_without_tensorflow_or_pydensecrf():
    """The bench as a subprocess on one CPU device, TensorFlow, clu and pydensecrf blocked:
    it says so, skips pydensecrf, labels the output SHRUNK and prints every stage's row
    (the multi-crop CAM unit timed, the rest 'not timed' to keep this test short)."""
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in " \
              "('tensorflow', 'tensorflow_datasets', 'clu', 'pydensecrf')]; "
    run = ("import runpy; sys.argv = ['bench.recipe', '--datasets=voc', '--width_div=32', "
           "'--res_div=16', '--shallow', '--repeats=1', '--units=cam']; "
           "runpy.run_module('bench.recipe', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", blocked + run], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "SHRUNK (widths / 32, resolutions / 16, one block per stage)" in out
    assert "pydensecrf is not installed: its CRF backend was skipped" in out
    assert "hours (jax CRF)" in out and "hours (pydensecrf CRF)" not in out
    rows = rows_of(out.splitlines())
    assert list(rows) == STAGES
    seconds, count, hours = float(rows["cam"][1]), int(rows["cam"][2]), float(rows["cam"][3])
    assert seconds > 0 and count == 10582 + 1449
    assert hours == pytest.approx(seconds * count / 3600, abs=0.01)
    assert rows["cls"][1] == "not timed" and int(rows["cls"][2]) == 20 * 10582 // 16
    assert re.search(r"precision: float32", out)
    assert not math.isnan(hours)


def test_models_compute_in_the_config_dtype_as_the_stages_build_them():
    """The timed classifier and segmenter go through ``precision.set_compute_dtype`` like
    ``stages.cls/seg.build_model``: bf16 convolutions, the float32 heads kept float32."""
    import jax.numpy as jnp
    from flax import nnx

    config = recipe.load_config("voc")
    config.compute_dtype = "bfloat16"
    size = units.Size(width_div=32, res_div=16, shallow=True)
    for build in (units.classifier, units.segmenter):
        model = nnx.eval_shape(lambda: build(config, size))  # shapes only: nothing initialised
        dtypes = {m.dtype for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)}
        assert dtypes == {jnp.dtype("bfloat16"), jnp.dtype("float32")}, (build.__name__, dtypes)
