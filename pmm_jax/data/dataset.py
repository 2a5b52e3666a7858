"""One dataset handle: ``config.data`` resolved once into the object stages read data through.

``open_dataset(config, wd)`` returns a :class:`Dataset`: the tfds name and data_dir (the
dataset prepared), the class names (so the number of classes), the logical ``train``/``val``
splits and how to read them: tf.data shards, numpy examples, ids, padded eval batches,
augmented training batches, and the mIoU of predictions against a split's ground truth.
Stages take this object and never read ``config.data`` themselves.

Dataset kinds: the part of ``config.data.name`` before ``/`` names an entry of
``pmm_jax.data.kinds.DATASET_KINDS``, whose ``open`` makes the dataset ready in the tfds
data_dir (``WORKDIR/tfds`` unless ``config.data.data_dir`` says otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from pmm_jax.data import builder_base, kinds, mmseg_augment, multicrop_batches, pipeline
from pmm_jax.files.workdir import Workdir
from pmm_jax import scoring

LOGICAL_SPLITS = ("train", "val")


def local_batch_size(global_batch: int, key: str) -> int:
    """This process's share of a global batch; the error names the config key."""
    if global_batch % jax.process_count():
        raise ValueError(f"{key}={global_batch} must be divisible by the number of processes "
                         f"({jax.process_count()})")
    return global_batch // jax.process_count()


def numpy_examples(ds) -> Iterator[dict]:
    """The examples of a tf.data dataset as numpy dicts, ``id`` as str, ``mask`` ``[H,W]``."""
    for ex in ds.as_numpy_iterator():
        ex = dict(ex)
        ex["id"] = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        ex["mask"] = np.asarray(ex["mask"]).reshape(ex["mask"].shape[:2])
        yield ex


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset and its logical splits; see the module docstring.

    ``train_split``/``val_split`` are the dataset's split names of the logical ``"train"``
    and ``"val"`` splits (``val_split`` None: the dataset has no val). ``eval_pad_to``
    (H, W) pads eval batches of a dataset of varying image size (None: a fixed-size split);
    ``shuffle_buffer`` is the training shuffle buffer (None: the whole shard).
    """

    name: str
    data_dir: str
    class_names: tuple[str, ...]
    train_split: str
    val_split: str | None
    eval_pad_to: tuple[int, int] | None = None
    shuffle_buffer: int | None = None
    # Dataset splits a config may name (``pseudo.eval_split``) that this dataset may lack:
    # scores on them are then not available (a folder's ``train_masked``).
    optional_splits: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Classes including the background (what the segmenter predicts)."""
        return len(self.class_names)

    @property
    def num_foreground(self) -> int:
        """Foreground classes (the CAM classifier's outputs)."""
        return self.num_classes - 1

    @property
    def canvas(self) -> tuple[int, int]:
        """The ``(H, W)`` every image is predicted on: ``eval_pad_to``, or the fixed image
        size of a dataset without one (``pmm_jax.predict``, ``pmm_jax.export``)."""
        if self.eval_pad_to:
            return tuple(int(v) for v in self.eval_pad_to)
        shape = builder_base.prepare(self.name, self.data_dir).info.features["image"].shape
        return int(shape[0]), int(shape[1])

    def has_split(self, split: str) -> bool:
        """Whether the logical split ``"train"``/``"val"`` exists."""
        return {"train": self.train_split, "val": self.val_split}[split] is not None

    def split_name(self, split: str, subset: int = 0) -> str:
        """The dataset's name of logical split ``"train"``/``"val"``; with ``subset`` > 0, of its
        first ``subset`` examples (tfds slicing: ``val[:N]``; each process then reads its
        shard of those, so it needs at least one per process)."""
        if split not in LOGICAL_SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {LOGICAL_SPLITS}")
        if not self.has_split(split):
            raise ValueError(f"dataset {self.name} has no {split} split")
        name = self.train_split if split == "train" else self.val_split
        return f"{name}[:{subset}]" if subset > 0 else name

    @property
    def dataset_splits(self) -> tuple[str, ...]:
        """The dataset's own split names (e.g. VOC's ``train``, ``train_aug``, ``val``), sorted."""
        return tuple(sorted(builder_base.prepare(self.name, self.data_dir).info.splits))

    def num_examples(self, split: str) -> int:
        """Examples of logical ``split`` (all processes together)."""
        return pipeline.num_examples(self.name, self.split_name(split), self.data_dir)

    def load(self, split: str, *, all_processes: bool = False, subset: int = 0):
        """The tf.data dataset of logical ``split`` (its first ``subset`` examples when > 0):
        this process's shard, or every example."""
        return self._load(self.split_name(split, subset), all_processes)

    def _load(self, dataset_split: str, all_processes: bool, decode: bool = True):
        kwargs = dict(process_index=0, process_count=1) if all_processes else {}
        return pipeline.load_split(self.name, dataset_split, self.data_dir, decode=decode,
                                   **kwargs)

    def examples(self, split: str, *, all_processes: bool = False) -> Iterator[dict]:
        """Numpy examples ``{id: str, image, mask [H,W], labels}`` of logical ``split``, in
        dataset order: this process's shard, or every example."""
        return numpy_examples(self.load(split, all_processes=all_processes))

    def dataset_split_examples(self, dataset_split: str) -> Iterator[dict]:
        """Like :meth:`examples` (every process, all of it) for a split named as the dataset
        names it (e.g. VOC's ``train``, 1,464 images, rather than the logical train split
        ``train_aug``)."""
        return numpy_examples(self._load(dataset_split, all_processes=True))

    def select(self, split: str, *, ids: Iterable[str] | None = None,
               limit: int | None = None) -> list[dict]:
        """Examples ``{id, image, mask, labels}`` of logical ``split`` picked by id (in dataset
        order), or its first ``limit``; every process sees the same."""
        wanted = None if ids is None else set(ids)
        chosen = []
        for ex in self.examples(split, all_processes=True):
            if wanted is None or ex["id"] in wanted:
                chosen.append({k: ex[k] for k in ("id", "image", "mask", "labels")})
            if limit is not None and len(chosen) >= limit:
                break
        return chosen

    def ids(self, split: str) -> list[str]:
        """The ids of logical ``split`` in dataset order (all processes)."""
        ds = self.load(split, all_processes=True).map(lambda ex: ex["id"])
        return [image_id.decode() for image_id in ds.as_numpy_iterator()]

    def eval_batches(self, split: str, batch_size: int, key: str, subset: int = 0):
        """Padded eval batches of this process's shard of ``split`` (to ``eval_pad_to``), or
        of its first ``subset`` examples when > 0; every process yields as many batches.
        ``batch_size`` is global; ``key`` names it in errors."""
        return pipeline.eval_batches(self.load(split, subset=subset),
                                     batch_size=local_batch_size(batch_size, key),
                                     pad_to=self.eval_pad_to)

    def num_eval_batches(self, split: str, batch_size: int, key: str) -> int:
        """How many batches :meth:`eval_batches` yields on every process (for progress bars)."""
        rows = pipeline.rows_per_process(self.name, self.split_name(split), self.data_dir)
        return -(-rows // local_batch_size(batch_size, key))

    def train_batches(self, section, key: str, *, seed: int, start_step: int,
                      mask_dir: str | None = None, mask_producer: str = ""):
        """Endless augmented batches of this process's shard of the train split, for a
        training section (``config.cls`` or ``config.seg``; ``key`` names its batch size).

        The augmentation follows the section: PMM's multi-crop tiles when
        ``section.multicrop.rough_masks`` is set (``multicrop.scales``, ``crop``, ``stride``);
        mmseg's VOC/COCO augmentation when ``section.augment == "mmseg"`` (rescale around
        ``img_scale`` by ``scale_range``, crop with ``cat_max_ratio``, flip, photometric
        distortion); else random-scale crops (``scale_range``). ``mask_dir``: masks replacing
        the dataset's (pseudo-masks, made by ``mask_producer``, named when one is missing).
        The stream is seeded once with ``seed``; from ``start_step`` on it yields exactly the
        batches an uninterrupted run does there (the consumed ones are skipped before any
        image is decoded, ``pipeline.stream``), so a resumed run is bit-identical.
        """
        ds = self._load(self.split_name("train"), all_processes=False, decode=False)
        if mask_dir is not None:
            ds = pipeline.with_masks_from_dir(ds, mask_dir, producer=mask_producer,
                                              num_classes=self.num_classes)
        shared = dict(batch_size=local_batch_size(section.batch_size, key),
                      crop_size=section.crop_size, seed=seed, start_step=start_step,
                      shuffle_buffer=self.shuffle_buffer)
        multicrop = section.get("multicrop")
        if multicrop is not None and multicrop.get("rough_masks"):
            return multicrop_batches.multicrop_train_batches(
                ds, rough_masks=multicrop.rough_masks, num_foreground=self.num_foreground,
                scales=tuple(multicrop.scales), tile=multicrop.crop, stride=multicrop.stride,
                **shared)
        if section.get("augment") == "mmseg":
            return mmseg_augment.mmseg_train_batches(
                ds, img_scale=tuple(section.img_scale), ratio_range=tuple(section.scale_range),
                cat_max_ratio=section.cat_max_ratio, **shared)
        return pipeline.train_batches(
            ds, num_foreground=self.num_foreground,
            scale_range=tuple(section.scale_range) if section.scale_range else None, **shared)

    def miou(self, split: str, read_pred: Callable[[str], np.ndarray],
             ids: Iterable[str] | None = None, *, rule: str,
             dataset_split: str | None = None) -> dict:
        """mIoU of predictions (``read_pred(id) -> [H,W]``) against a split's ground truth.

        ``rule``: the IoU rule (``scoring.iou_from_confusion``); ``ids`` restricts the
        evaluation to a subset; ``dataset_split`` scores against that split of the dataset
        instead of the logical ``split`` (:meth:`dataset_split_examples`). Returns
        ``{"miou": float, "per_class": {name: iou}}`` with IoUs as fractions, or None
        throughout (not available, not 0) when no scored image has ground truth.
        """
        wanted = None if ids is None else set(ids)
        cm = np.zeros((self.num_classes,) * 2, np.int64)
        source = (self.examples(split, all_processes=True) if dataset_split is None
                  else self.dataset_split_examples(dataset_split))
        for ex in source:
            if wanted is None or ex["id"] in wanted:
                cm += scoring.confusion_matrix(read_pred(ex["id"]), ex["mask"], self.num_classes)
        per_class, mean = scoring.iou_from_confusion(cm, rule=rule)
        if not cm.sum():
            return {"miou": None, "per_class": {name: None for name in self.class_names}}
        return {"miou": float(mean),
                "per_class": {self.class_names[i]: (None if np.isnan(v) else float(v))
                              for i, v in enumerate(per_class)}}


def open_dataset(config, wd: Workdir) -> Dataset:
    """The dataset of ``config.data``, prepared in its data_dir (``config.data.data_dir``,
    else ``WORKDIR/tfds``). Several processes: let one open it first (it may be built)."""
    data = config.data
    data_dir = wd.data_dir(data.data_dir)
    fields = dict(train_split=data.train_split, val_split=data.val_split or None,
                  eval_pad_to=tuple(data.eval_pad_to) if data.eval_pad_to else None,
                  shuffle_buffer=data.shuffle_buffer)
    fields.update(kinds.kind_of(data).open(data, data_dir))
    fields["class_names"] = tuple(fields["class_names"])
    return Dataset(data_dir=data_dir, **fields)
