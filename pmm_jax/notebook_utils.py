"""Views of a run's workdir as numpy pictures and plain tables, for the notebooks.

The notebooks in ``notebooks/`` only call these functions and draw what they return, so the
logic is tested here and cannot rot in a cell; the pictures come from ``pmm_jax.drawing``
(which the stages use for TensorBoard). Pictures are uint8 RGB ``[H, W, 3]``; tables are
lists of dicts (one per row). Nothing here trains or writes into the workdir.
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Iterable

import ml_collections
import numpy as np

from pmm_jax import drawing
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir

if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``WORKDIR/config.json``."""
    path = Workdir(workdir).config_json
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of a pmm_jax run?")
    return ml_collections.ConfigDict(safe_io.read_json(path))


def dataset(config, workdir: str) -> Dataset:
    """The run's dataset (``pmm_jax.data.dataset``): the workdir's tensorflow-datasets copy
    (``WORKDIR/tfds`` unless configured)."""
    from pmm_jax.data.dataset import open_dataset

    return open_dataset(config, Workdir(workdir))


def examples(config, workdir: str, split: str, ids: Iterable[str] | None = None,
             limit: int | None = None) -> list[dict]:
    """Dataset examples ``{id, image uint8 [H,W,3], mask [H,W], labels [C]}`` of ``split``.

    ``ids`` picks images by id (in dataset order); otherwise the first ``limit`` images.
    """
    return dataset(config, workdir).select(split, ids=ids, limit=limit)


def predicted_runs(workdir: str, split: str) -> list[str]:
    """Segmenter runs with predictions of ``split`` in the workdir, sorted."""
    root = os.path.join(workdir, "predictions")
    return sorted(r for r in os.listdir(root) if os.path.isdir(os.path.join(root, r, split))) \
        if os.path.isdir(root) else []


def trained_segmenters(workdir: str) -> list[str]:
    """Segmenter runs with a checkpoint in the workdir (``ce``, ``pus``, ``cycle1``...), sorted."""
    root = os.path.join(workdir, "seg")
    return sorted(r for r in os.listdir(root) if os.path.isdir(os.path.join(root, r, "ckpt"))) \
        if os.path.isdir(root) else []


def predict(config, workdir: str, run: str, images: list[np.ndarray]) -> list[np.ndarray]:
    """Segmenter ``run``'s label maps ``[H, W]`` for uint8 images (any sizes, one at a time).

    For images the pipeline did not predict (e.g. train images when no cycle ran); loads the
    checkpoint and runs the model under ``nnx.jit`` on the default device.
    """
    from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD
    from pmm_jax.segmentation import best_checkpoint, segmenter

    model = best_checkpoint.load_segmenter(config, Workdir(workdir), run,
                                           dataset(config, workdir).num_classes)
    labels = segmenter.jitted_predict_labels
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return [np.asarray(labels(model, {"image": ((image - mean) / std)[None]})[0])
            for image in images]


def image_views(config, workdir: str, example: dict, split: str = "train",
                predictions: dict[str, np.ndarray] | None = None) -> dict:
    """Everything the explorer notebook shows for one image of ``split``.

    ``{"image", "cams": {class: pic}, "cvs": {class: {"before", "after"}}, "masks": {name:
    pic}}``: CAMs from ``WORKDIR/cams/<split>``, the baseline and PPMG pseudo-masks (train
    only, where they are made), segmenter predictions of ``split`` found in the workdir, or
    given as ``predictions`` ``{run: [H, W]}`` (from :func:`predict`), and the ground truth.
    """
    wd = Workdir(workdir)
    names = dataset(config, workdir).class_names
    image = example["image"]
    cam_file = os.path.join(wd.cams(split), f"{example['id']}.npy")
    cams = safe_io.read_cams(cam_file) if os.path.exists(cam_file) else {}
    masks = drawing.mask_pictures(
        workdir, example["id"], variants=drawing.SHOWN_VARIANTS if split == "train" else (),
        split=split, runs=predicted_runs(workdir, split))
    for run, labels in (predictions or {}).items():
        masks[f"prediction/{run}"] = drawing.colorize_mask(labels)
    masks["ground truth"] = drawing.colorize_mask(example["mask"])
    return {
        "image": image,
        "cams": drawing.cam_pictures(image, cams, names),
        "cvs": drawing.cvs_pictures(image, cams, names, t=config.pseudo.t, s=config.pseudo.s),
        "masks": masks,
    }


def results_rows(workdir: str) -> list[dict]:
    """The run's ``results.json`` as rows ``{"result", "miou_percent"}`` (empty before eval)."""
    path = Workdir(workdir).results_json
    if not os.path.exists(path):
        return []
    from pmm_jax.tools import results_table

    return [{"result": name, "miou_percent": 100 * value}
            for name, value in results_table.result_rows(safe_io.read_json(path))]


def markdown_table(rows: list[dict]) -> str:
    """Rows of dicts as a Markdown table (floats with two decimals)."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def log_dirs(workdir: str) -> dict[str, str]:
    """TensorBoard folders of a run: ``{"cls": .., "cam": .., "seg/pus": ..}`` (sorted)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(workdir, "**", "tb"), recursive=True)):
        found[os.path.relpath(os.path.dirname(path), workdir)] = path
    return found


def read_scalars(log_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` of every scalar in a TensorBoard folder, sorted by step.

    Reads the event files with TensorFlow's record reader (clu writes scalars as tensors of
    the ``scalars`` plugin); a resumed run's repeated steps keep the last value.
    """
    import tensorflow as tf

    series: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalar = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    scalar = float(value.simple_value)
                else:
                    continue
                series.setdefault(value.tag, {})[int(event.step)] = scalar
    return {tag: (np.asarray(sorted(points)), np.asarray([points[s] for s in sorted(points)]))
            for tag, points in sorted(series.items())}


def training_curves(workdir: str) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Scalars of every TensorBoard folder of a run: ``{model: {tag: (steps, values)}}``.

    Folders without scalars (the image-only ``cam`` and ``pseudo`` summaries) are left out.
    """
    curves = {name: read_scalars(path) for name, path in log_dirs(workdir).items()}
    return {name: tags for name, tags in curves.items() if tags}
