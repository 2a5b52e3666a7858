"""Stage ``pseudo``: pseudo-masks from the train split's CAMs, one folder per variant.

The variant named by ``config.pseudo.train_on`` (PPMG by default) is made for every train
image, because the segmenter trains on it; the other variants (the paper's Table 2 rows:
baseline CRF, CRF + CVS, PPMG without CVS) are made only for the images they are scored on.

Scoring (``config.pseudo.eval_split``, ``eval_subset``): every variant's mIoU is measured on
the images of the dataset split ``eval_split`` against that split's ground truth, as the
paper does: on VOC the ``train`` split (1,464 images with VOC ground truth; they are part of
``train_aug``, the split the masks are made for, where they keep the same VOC masks), not
SBD's masks. ``eval_subset`` > 0 keeps only the first that many of them (the demo's quick
score); 0 scores them all. The split and image count go to the metrics as
``pseudo_mask_eval``.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np

from pmm_jax import drawing
from pmm_jax.files.workdir import Workdir
from pmm_jax.masks import dense_crf, generator
from pmm_jax.stages import common
from pmm_jax.stages.stage import Stage
from pmm_jax.training import distributed


if TYPE_CHECKING:  # TensorFlow: imported where data is read
    from pmm_jax.data.dataset import Dataset


def variant_config(config, method: str, num_classes: int) -> ml_collections.ConfigDict:
    """The ``generator.generate`` config of variant ``method``: every key of
    ``config.pseudo`` the generator's config has (``alpha``, ``t``, ``s``, the CRF
    parameters, ...), the CRF backend ``config.crf.backend`` and the dataset's
    ``num_classes`` (background included)."""
    cfg = generator.default_config(method)
    pseudo = config.pseudo.to_dict()
    cfg.update({key: value for key, value in pseudo.items() if key in cfg and key != "crf"})
    cfg.num_classes = num_classes
    cfg.num_workers = cfg.num_workers or None  # 0: every available core
    cfg.crf.update(pseudo["crf"])
    cfg.crf.backend = dense_crf.config_backend(config)  # config.crf.backend: pydensecrf | jax
    return cfg


def records(wd: Workdir, data: Dataset, ids: set[str] | None):
    """``(id, image, cams)`` of every train image, optionally only ``ids``, in dataset order.

    Every process sees the same records; ``generator.generate`` then makes the masks of
    records ``i, i + n, ...`` on process ``i`` of ``n``, so each mask is computed once and the
    eval subset (the first images) is spread over all processes too.
    """
    remaining = None if ids is None else len(ids)
    for ex in data.examples("train", all_processes=True):
        if remaining == 0:
            return  # every wanted id was yielded: stop decoding the rest of the split
        if ids is None or ex["id"] in ids:
            if remaining is not None:
                remaining -= 1
            yield ex["id"], ex["image"], os.path.join(wd.cams("train"), f"{ex['id']}.npy")


def eval_ids(config, wd: Workdir, data: Dataset) -> list[str]:
    """The ids the pseudo-masks are scored on: those of the dataset split
    ``config.pseudo.eval_split`` (the first ``eval_subset`` when > 0), in dataset order.

    Raises ValueError naming the key when the split does not exist or holds images without a
    train CAM, i.e. images outside ``config.data.train_split``.
    """
    split, subset = config.pseudo.eval_split, config.pseudo.eval_subset
    if split in data.optional_splits and split not in data.dataset_splits:
        return []  # e.g. a folder without masked train images: nothing to score on
    if split not in data.dataset_splits:
        raise ValueError(f"config.pseudo.eval_split={split!r} is not a split of "
                         f"{data.name} (it has {list(data.dataset_splits)})")
    ids = list(itertools.islice((ex["id"] for ex in data.dataset_split_examples(split)),
                                subset if subset > 0 else None))
    missing = [i for i in ids if not os.path.exists(os.path.join(wd.cams("train"), f"{i}.npy"))]
    if missing:
        raise ValueError(
            f"config.pseudo.eval_split={split!r}: {len(missing)} of its {len(ids)} images have no "
            f"train CAM in {wd.cams('train')} (e.g. {missing[0]}); pseudo-masks are made for "
            f"config.data.train_split={data.train_split!r}, which must contain them")
    return ids


def variants(config) -> list[str]:
    """The variants made: ``config.pseudo.train_on`` first, then ``config.pseudo.variants``."""
    return list(dict.fromkeys([config.pseudo.train_on, *config.pseudo.variants]))


def summary_images(wd: Workdir, data: Dataset, ids: list[str], variants: list[str]
                   ) -> dict[str, np.ndarray]:
    """TensorBoard pictures (tag ``pseudo/<id>``): image, each variant's mask, ground truth."""
    pictures = {}
    for ex in data.select("train", ids=ids):
        masks = drawing.mask_pictures(wd.root, ex["id"], ex["mask"], variants=variants)
        pictures[f"pseudo/{ex['id']}"] = drawing.strip([ex["image"], *masks.values()])
    return pictures


def run(config, wd: Workdir, data: Dataset) -> dict:
    subset = eval_ids(config, wd, data)
    num_train = data.num_examples("train")
    stats, mious = {}, {}
    for method in variants(config):
        wanted = None if method == config.pseudo.train_on else set(subset)
        out_dir = wd.pseudo_masks(method, "train")
        stats[method] = generator.generate(
            records(wd, data, wanted), out_dir, variant_config(config, method, data.num_classes),
            num_workers=config.pseudo.num_workers or None,
            process_index=jax.process_index(), process_count=jax.process_count(),
            total=len(subset) if wanted else num_train)
        stats[method]["per_process"] = distributed.gather_ints(
            {k: stats[method][k] for k in ("written", "skipped", "failed")})
        distributed.barrier(f"pseudo-{method}-written")  # the mIoU reads every process's masks
        mious[method] = (data.miou("train", common.mask_reader(out_dir), ids=subset,
                                   rule=config.eval.rule, dataset_split=config.pseudo.eval_split)
                         if subset else {"miou": None, "per_class": {}})  # nothing to score
    if distributed.is_main():
        common.write_images(wd.log_dir("pseudo"), summary_images(
            wd, data, subset[:common.NUM_SUMMARY_IMAGES], variants(config)))
    return {"pseudo_mask_miou": {m: r["miou"] for m, r in mious.items()},
            "pseudo_mask_per_class": {m: r["per_class"] for m, r in mious.items()},
            "pseudo_mask_eval": {"split": config.pseudo.eval_split, "num_images": len(subset)},
            "generation": stats}


STAGE = Stage(
    name="pseudo", run=run, requires="cam", sections=("crf", "pseudo", "eval.rule"),
    writes=lambda config, wd: {wd.pseudo_masks(v): "files" for v in variants(config)},
    owns=lambda config, wd: [*(os.path.dirname(wd.pseudo_masks(v)) for v in variants(config)),
                             wd.log_dir("pseudo")])
