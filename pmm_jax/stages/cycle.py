"""Stage ``cycle``: cyclic pseudo-masks (paper section 3.5).

Cycle i predicts the train split with the previous segmenter (``config.cycle.source`` for
the first cycle, ``cycle{i-1}`` after), writes those predictions as the new pseudo-masks
``WORKDIR/pseudo/cycle{i}/train``, and trains segmenter ``cycle{i}`` on them from the same
initial weights with ``config.cycle.loss`` (plain CE in the paper).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import seg

if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def cycle_runs(config) -> list[str]:
    return [f"cycle{i}" for i in range(1, config.cycle.num_cycles + 1)]


def run(config, wd: Workdir, data: Dataset) -> dict:
    source = config.cycle.source
    for run in cycle_runs(config):
        mask_dir = wd.pseudo_masks(run, "train")
        seg.predict_split(config, wd, data, source, "train", mask_dir, stage="cycle")
        seg.train_segmenter(config, wd, data, run, mask_dir, config.cycle.loss)
        source = run
    return {"runs": cycle_runs(config)}
