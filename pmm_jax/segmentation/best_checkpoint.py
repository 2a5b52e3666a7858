"""Which checkpoint of a segmenter run is used: the best on val when ``config.seg.eval_every``
validates during training (mmseg's ``save_best``), else the final one.

``keep_best`` is the trainer's ``eval_fn``: val mIoU (or that of the first
``config.seg.val_subset`` val images) with ``config.eval``'s test-time pipeline every
``eval_every`` steps; the best model so far goes to ``seg/<run>/best/ckpt`` with
``best.json`` {step, miou}, which survives a resumed run. ``load_segmenter`` restores exactly
the checkpoint :func:`segmenter_checkpoint` names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir, made_by
from pmm_jax.segmentation import inference, runs, segmenter
from pmm_jax import scoring
from pmm_jax.training import checkpoints, distributed

if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def best_dir(wd: Workdir, run: str) -> str:
    """Where ``config.seg.eval_every`` keeps run's best-val checkpoint (and ``best.json``)."""
    return wd.ckpt_dir(f"seg/{run}/best")


def best_record(wd: Workdir, run: str) -> str:
    """``best.json`` ({step, miou}) of the checkpoint in :func:`best_dir`."""
    return os.path.join(os.path.dirname(best_dir(wd, run)), "best.json")


def val_miou(config, data: Dataset, model) -> float:
    """mIoU of ``model`` on the val split, or its first ``config.seg.val_subset`` images when
    > 0, with config.eval's test-time pipeline (all processes)."""
    source = "the segmenter being trained, in its periodic validation (config.seg.eval_every)"
    # config.eval, config.crf.backend
    predict = inference.predictor(model, config, source=source)
    num_classes = data.num_classes
    cm = np.zeros((num_classes, num_classes), np.int64)
    for batch in data.eval_batches("val", config.eval.batch_size, "config.eval.batch_size",
                                   subset=config.seg.get("val_subset", 0)):
        labels = predict(batch)
        for i in np.flatnonzero(batch["valid"]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            cm += scoring.confusion_matrix(labels[i, :h, :w], batch["mask"][i, :h, :w],
                                            num_classes)
    if jax.process_count() > 1:
        cm = np.asarray(multihost_utils.process_allgather(cm)).sum(axis=0)
    return float(scoring.iou_from_confusion(cm, rule=config.eval.rule)[1])


def keep_best(config, wd: Workdir, data: Dataset, run: str):
    """``eval_fn`` for ``trainer.train``: val mIoU every ``config.seg.eval_every`` steps; the
    best model so far is saved to ``best_dir`` with ``best.json`` {step, miou}."""
    directory, record = best_dir(wd, run), best_record(wd, run)

    def eval_fn(step: int, model) -> None:
        miou = val_miou(config, data, model)
        best = safe_io.read_json(record)["miou"] if os.path.exists(record) else -1.0
        if distributed.is_main():
            subset = config.seg.get("val_subset", 0)
            images = f"first {subset} val images" if subset else "val"
            print(f"seg {run} step {step}: mIoU {100 * miou:.2f} on {images} "
                  f"(best {100 * max(best, miou):.2f})", flush=True)
        if miou > best:
            checkpoints.save_model(model, directory, step)
            if distributed.is_main():
                safe_io.write_json(record, {"step": step, "miou": miou})
        distributed.barrier(f"seg-{run}-best-{step}")

    return eval_fn


def segmenter_checkpoint(config, wd: Workdir, run: str) -> tuple[str, int]:
    """Segmenter ``run``'s checkpoint folder and step: its best-val one when
    ``config.seg.eval_every`` kept one (the step ``best.json`` records), else its final one
    (``config.seg.num_steps``)."""
    record = best_record(wd, run)
    if config.seg.get("eval_every", 0) and os.path.exists(record):
        return best_dir(wd, run), int(safe_io.read_json(record)["step"])
    return wd.ckpt_dir(f"seg/{run}"), config.seg.num_steps


def load_segmenter(config, wd: Workdir, run: str, num_classes: int) -> nnx.Module:
    """Segmenter ``run`` (``num_classes`` classes) restored from exactly the checkpoint of
    :func:`segmenter_checkpoint`."""
    directory, step = segmenter_checkpoint(config, wd, run)
    return checkpoints.restore_model(segmenter.build_model(config, num_classes=num_classes),
                                     directory, step=step, hint=f"segmenter '{run}': "
                                     + made_by(runs.trained_by(run)))
