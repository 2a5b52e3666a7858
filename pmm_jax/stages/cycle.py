"""Stage ``cycle``: cyclic pseudo-masks (paper section 3.5).

Cycle i predicts the train split with the previous segmenter (``config.cycle.source`` for
the first cycle, ``cycle{i-1}`` after), writes those predictions as the new pseudo-masks
``WORKDIR/pseudo/cycle{i}/train``, and trains segmenter ``cycle{i}`` on them from the same
initial weights with ``config.cycle.loss`` (plain CE in the paper).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import runs
from pmm_jax.stages import seg
from pmm_jax.stages.stage import Stage


if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def run(config, wd: Workdir, data: Dataset) -> dict:
    source = config.cycle.source
    for run in runs.cycle_runs(config):
        mask_dir = wd.pseudo_masks(run, "train")
        seg.predict_split(config, wd, data, source, "train", mask_dir, stage="cycle")
        seg.train_segmenter(config, wd, data, run, mask_dir, config.cycle.loss)
        source = run
    return {"runs": runs.cycle_runs(config)}


def _writes(config, wd: Workdir) -> dict[str, str]:
    out = {wd.pseudo_masks(run): "files" for run in runs.cycle_runs(config)}
    out.update({wd.ckpt_dir(f"seg/{run}"): "checkpoint" for run in runs.cycle_runs(config)})
    return out


STAGE = Stage(
    name="cycle", run=run, requires="seg", sections=("cycle",), writes=_writes,
    owns=lambda config, wd: [path for run in runs.cycle_runs(config) for path in (
        os.path.dirname(wd.pseudo_masks(run)), os.path.join(wd.root, "seg", run))],
    reads=lambda config: ["cls"] if config.seg.model.get("init_from_cls") else [],
    final_step=lambda config: config.seg.num_steps)
