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

from pmm_jax import stages
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import common, cycle, seg

if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def trained_runs(config, wd: Workdir) -> list[str]:
    """Segmenter runs of this config that have a checkpoint."""
    runs = list(config.seg.runs) + cycle.cycle_runs(config)
    return [r for r in runs if os.path.isdir(wd.ckpt_dir(f"seg/{r}"))]


def results(config, wd: Workdir, seg_mious: dict, eval_seconds: float, *, dataset: str
            ) -> dict:
    """The results dict: figures of every completed stage plus this stage's mIoUs and time;
    ``dataset`` is the dataset's tfds name."""
    done = stages.completed(wd)
    out: dict = {"dataset": dataset, "iou_rule": config.eval.rule}
    if "cam" in done:
        m = done["cam"]["metrics"]
        out.update(cam_miou=m["cam_miou"], cam_bg_threshold=m["cam_bg_threshold"])
    if "pseudo" in done:
        out["pseudo_mask_miou"] = done["pseudo"]["metrics"]["pseudo_mask_miou"]
        if "pseudo_mask_eval" in done["pseudo"]["metrics"]:  # a marker may lack it
            out["pseudo_mask_eval"] = done["pseudo"]["metrics"]["pseudo_mask_eval"]
    cycles = [r for r in cycle.cycle_runs(config) if r in seg_mious]
    out["seg_miou"] = dict(seg_mious)
    if cycles:
        out["seg_miou"]["cyclic"] = seg_mious[cycles[-1]]
    out["seconds"] = {name: rec["seconds"] for name, rec in done.items() if name != "eval"}
    out["seconds"]["eval"] = round(eval_seconds, 2)
    return out


def result_rows(res: dict) -> list[tuple[str, float | None]]:
    """``(result, mIoU fraction or None: not available)`` rows of a results dict, in table
    order.

    ``seg_miou["cyclic"]`` repeats the last cycle's figure (a stable key for scripts): it is
    listed once, on that cycle's row.
    """
    rows = []
    if "cam_miou" in res:
        rows.append((f"CAM (bg threshold {res['cam_bg_threshold']})", res["cam_miou"]))
    scored = res.get("pseudo_mask_eval")
    where = f"{scored['split']}, {scored['num_images']} images" if scored else "train subset"
    for name, value in res.get("pseudo_mask_miou", {}).items():
        rows.append((f"pseudo-mask {name} ({where})", value))
    seg_mious = res.get("seg_miou", {})
    last_cycle = max((n for n in seg_mious if n.startswith("cycle") and n[5:].isdigit()),
                     key=lambda n: int(n[5:]), default=None)
    for name, value in seg_mious.items():
        if name == "cyclic" and last_cycle is not None:
            continue
        label = f"{name} (cyclic)" if name == last_cycle else name
        rows.append((f"segmenter {label} (val)", value))
    return rows


def format_table(res: dict) -> str:
    """The results as a Markdown table (mIoU in percent; "n/a" where not available: a
    dataset without val, or without ground truth on the images scored)."""
    rows = result_rows(res)
    lines = ["| result | mIoU (%) |", "| --- | --- |"]
    lines += [f"| {name} | {'n/a' if value is None else f'{100 * value:.2f}'} |"
              for name, value in rows]
    lines += ["", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in res.get("seconds", {}).items()]
    return "\n".join(lines)


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
        print(format_table(res), flush=True)
    return {"seg_miou": seg_mious}
