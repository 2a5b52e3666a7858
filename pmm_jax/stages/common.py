"""Helpers the stages share: dataset access, batch sizes and mIoU against a split's labels."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import jax
import numpy as np

from pmm_jax.files import io
from pmm_jax.files.workdir import Workdir
from pmm_jax.tools import scoring
from pmm_jax.training import distributed

if TYPE_CHECKING:  # neither is needed to import a stage's train step (the benchmarks do)
    import ml_collections

log = logging.getLogger(__name__)

# Images in the cam and pseudo stages' TensorBoard picture summaries.
NUM_SUMMARY_IMAGES = 4


def num_foreground(config: ml_collections.ConfigDict) -> int:
    """Number of foreground classes (the CAM classifier's outputs)."""
    return config.data.num_classes - 1


def data_dir(config: ml_collections.ConfigDict, wd: Workdir) -> str:
    """The tensorflow-datasets data_dir of this run, with the dataset prepared if synthetic."""
    path = wd.data_dir(config.data.data_dir)
    if config.data.name.startswith("synthetic_wsss"):
        from pmm_jax.data import synthetic  # TensorFlow: imported where data is read

        synthetic.prepare(config.data.name, path)
    return path


def split_name(config: ml_collections.ConfigDict, split: str, subset: int = 0) -> str:
    """Maps the pipeline's logical split ("train"/"val") to the dataset's split name; with
    ``subset`` > 0, to its first ``subset`` examples (tfds slicing: ``val[:N]``; each process
    then reads its shard of those, so it needs at least one per process)."""
    name = {"train": config.data.train_split, "val": config.data.val_split}[split]
    return f"{name}[:{subset}]" if subset > 0 else name


def local_batch_size(global_batch: int, key: str) -> int:
    """This process's share of a global batch; the error names the config key."""
    if global_batch % jax.process_count():
        raise ValueError(f"{key}={global_batch} must be divisible by the number of processes "
                         f"({jax.process_count()})")
    return global_batch // jax.process_count()


def split_dataset(config, wd: Workdir, split: str, *, all_processes: bool = False,
                  subset: int = 0, decode: bool = True):
    """The tf.data dataset of ``split`` (its first ``subset`` examples when > 0): this
    process's shard, or every example; ``decode=False`` keeps images encoded (training
    streams decode after skipping, ``pipeline.stream``)."""
    from pmm_jax.data import pipeline  # TensorFlow: imported where data is read

    kwargs = dict(process_index=0, process_count=1) if all_processes else {}
    return pipeline.load_split(config.data.name, split_name(config, split, subset),
                               data_dir(config, wd), decode=decode, **kwargs)


def eval_batches(config, wd: Workdir, split: str, batch_size: int, key: str, subset: int = 0):
    """Padded eval batches of this process's shard of ``split`` (``config.data.eval_pad_to``),
    or of its first ``subset`` examples when > 0. Every process yields as many batches."""
    from pmm_jax.data import pipeline  # TensorFlow: imported where data is read

    pad_to = tuple(config.data.eval_pad_to) if config.data.eval_pad_to else None
    return pipeline.eval_batches(split_dataset(config, wd, split, subset=subset),
                                 batch_size=local_batch_size(batch_size, key), pad_to=pad_to)


def num_eval_batches(config, wd: Workdir, split: str, batch_size: int, key: str) -> int:
    """How many batches :func:`eval_batches` yields on every process (for progress bars)."""
    from pmm_jax.data import pipeline  # TensorFlow: imported where data is read

    rows = pipeline.rows_per_process(config.data.name, split_name(config, split),
                                     data_dir(config, wd))
    return -(-rows // local_batch_size(batch_size, key))


def train_batches(config, ds, section, key: str, start_step: int):
    """Endless augmented batches for a training section (``config.cls`` or ``config.seg``)
    from batch ``start_step`` on: the stream seeded with ``config.seed`` of an uninterrupted
    run, the consumed batches skipped (``pipeline.stream``), so a resumed run is exact."""
    from pmm_jax.data import pipeline  # TensorFlow: imported where data is read

    return pipeline.train_batches(
        ds, batch_size=local_batch_size(section.batch_size, key), crop_size=section.crop_size,
        seed=config.seed, start_step=start_step, num_classes_fg=num_foreground(config),
        scale_range=tuple(section.scale_range) if section.scale_range else None,
        shuffle_buffer=config.data.shuffle_buffer)


def examples(config, wd: Workdir, split: str, *, all_processes: bool = False) -> Iterator[dict]:
    """Numpy examples ``{id: str, image, mask [H,W], labels}`` of a split, in dataset order."""
    return numpy_examples(split_dataset(config, wd, split, all_processes=all_processes))


def dataset_split_examples(config, wd: Workdir, dataset_split: str) -> Iterator[dict]:
    """Like :func:`examples` (every process, all of it) for a split named as the dataset names
    it (e.g. VOC's ``train``, 1,464 images, rather than the logical train split ``train_aug``)."""
    from pmm_jax.data import pipeline  # TensorFlow: imported where data is read

    return numpy_examples(pipeline.load_split(config.data.name, dataset_split,
                                              data_dir(config, wd), process_index=0,
                                              process_count=1))


def numpy_examples(ds) -> Iterator[dict]:
    """The examples of a tf.data dataset as numpy dicts, ``id`` as str, ``mask`` ``[H,W]``."""
    for ex in ds.as_numpy_iterator():
        ex = dict(ex)
        ex["id"] = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        ex["mask"] = np.asarray(ex["mask"]).reshape(ex["mask"].shape[:2])
        yield ex


def miou(config, wd: Workdir, split: str, read_pred: Callable[[str], np.ndarray],
         ids: Iterable[str] | None = None, *, dataset_split: str | None = None) -> dict:
    """mIoU of predictions (``read_pred(id) -> [H,W]``) against a split's ground truth.

    Uses the config's IoU rule; ``ids`` restricts the evaluation to a subset;
    ``dataset_split`` scores against that split of the dataset instead of the logical
    ``split`` (:func:`dataset_split_examples`). Returns ``{"miou": float, "per_class":
    {name: iou}}`` with IoUs as fractions.
    """
    wanted = None if ids is None else set(ids)
    cm = np.zeros((config.data.num_classes,) * 2, np.int64)
    source = (examples(config, wd, split, all_processes=True) if dataset_split is None
              else dataset_split_examples(config, wd, dataset_split))
    for ex in source:
        if wanted is None or ex["id"] in wanted:
            cm += scoring.confusion_matrix(read_pred(ex["id"]), ex["mask"], config.data.num_classes)
    per_class, mean = scoring.iou_from_confusion(cm, rule=config.eval.rule)
    names = class_names(config)
    return {"miou": float(mean),
            "per_class": {names[i]: (None if np.isnan(v) else float(v)) for i, v in enumerate(per_class)}}


def write_images(log_dir: str, images: dict[str, np.ndarray], step: int = 0) -> None:
    """Writes uint8 ``[H, W, 3]`` pictures to TensorBoard, one tag each, on process 0 only."""
    if not distributed.is_main() or not images:
        return
    from clu import metric_writers

    writer = metric_writers.SummaryWriter(log_dir)
    try:
        writer.write_images(step, {tag: picture[None] for tag, picture in images.items()})
    finally:
        writer.close()


def class_names(config) -> tuple[str, ...]:
    from pmm_jax.constants import CLASS_NAMES
    return CLASS_NAMES[config.data.class_names]


def mask_reader(directory: str) -> Callable[[str], np.ndarray]:
    """``id -> mask`` reading ``directory/<id>.png``."""
    return lambda image_id: io.read_mask(os.path.join(directory, f"{image_id}.png"))


def made_by(stage: str) -> str:
    """What to do when a checkpoint that stage ``stage`` writes is missing or damaged."""
    return (f"it is made by stage '{stage}': include {stage} in --config.stages and rerun (it "
            "trains again from its newest intact step; the stages made from the old model are "
            "then refused until redone with --redo)")


def warn_random_init(config, model: str) -> None:
    """Warns, when ``config.allow_random_init`` is set (rehearsals), that ``config.<model>``
    trains without ImageNet weights (no ``model.init_from``, nor for the segmenter
    ``init_from_cls``): its figures are near chance."""
    from pmm_jax import stages

    if config.get("allow_random_init") and not stages.has_initial_weights(config[model]):
        log.warning("%s: no ImageNet weights loaded (config.%s.model.init_from is empty; "
                    "allow_random_init=True): training from random initialisation, so the "
                    "mIoUs of this run are not the paper's", model, model)
