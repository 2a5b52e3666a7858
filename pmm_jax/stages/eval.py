"""Stage ``eval``: segmenter mIoU on val, and the run's results table.

Every trained segmenter (``config.seg.runs`` and the cycles) predicts the val split into
``WORKDIR/predictions/<run>/val``; its mIoU joins the CAM and pseudo-mask figures recorded
by the earlier stages in ``WORKDIR/results.json``, which is also printed as a table.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import runs
from pmm_jax.stages import common, planner, seg
from pmm_jax.stages.stage import Stage
from pmm_jax.tools import results_table


if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def trained_runs(config, wd: Workdir) -> list[str]:
    """Segmenter runs of this config that have a checkpoint."""
    return [r for r, _ in runs.all_runs(config) if os.path.isdir(wd.ckpt_dir(f"seg/{r}"))]


def results(config, wd: Workdir, seg_mious: dict, eval_seconds: float, *, dataset: str
            ) -> dict:
    """The results dict: figures of every completed stage plus this stage's mIoUs and time;
    ``dataset`` is the dataset's tfds name."""
    done = planner.completed(wd)
    out: dict = {"dataset": dataset, "iou_rule": config.eval.rule}
    if "cam" in done:
        m = done["cam"]["metrics"]
        out.update(cam_miou=m["cam_miou"], cam_bg_threshold=m["cam_bg_threshold"])
    if "pseudo" in done:
        out["pseudo_mask_miou"] = done["pseudo"]["metrics"]["pseudo_mask_miou"]
        if "pseudo_mask_eval" in done["pseudo"]["metrics"]:  # a marker may lack it
            out["pseudo_mask_eval"] = done["pseudo"]["metrics"]["pseudo_mask_eval"]
    cycles = [r for r in runs.cycle_runs(config) if r in seg_mious]
    out["seg_miou"] = dict(seg_mious)
    if cycles:
        out["seg_miou"]["cyclic"] = seg_mious[cycles[-1]]
    out["seconds"] = {name: rec["seconds"] for name, rec in done.items() if name != "eval"}
    out["seconds"]["eval"] = round(eval_seconds, 2)
    return out


def run(config, wd: Workdir, data: Dataset) -> dict:
    start = time.time()
    seg_mious = {}
    for run in trained_runs(config, wd):
        if not data.has_split("val"):
            seg_mious[run] = None  # no val: not available
            continue
        out_dir = wd.predictions(run, "val")
        seg.predict_split(config, wd, data, run, "val", out_dir)
        seg_mious[run] = data.miou("val", common.mask_reader(out_dir),
                                   rule=config.eval.rule)["miou"]
    res = results(config, wd, seg_mious, time.time() - start, dataset=data.name)
    if jax.process_index() == 0:
        safe_io.write_json(wd.results_json, res)
        print(results_table.format_table(res), flush=True)
    return {"seg_miou": seg_mious}


STAGE = Stage(
    name="eval", run=run, requires="seg", sections=(),
    writes=lambda config, wd: {**{wd.predictions(run, "val"): "files"
                                  for run, _ in runs.all_runs(config)},
                               wd.results_json: "file"},
    owns=lambda config, wd: [os.path.join(wd.root, "predictions"), wd.results_json],
    reads=lambda config: ["cycle"] if config.cycle.num_cycles > 0 else [])
