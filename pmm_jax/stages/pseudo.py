"""Stage ``pseudo``: pseudo-masks from the train split's CAMs, one folder per variant.

The variant named by ``config.pseudo.train_on`` (PPMG by default) is made for every train
image, because the segmenter trains on it; the other variants (the paper's Table 2 rows:
baseline CRF, CRF + CVS, PPMG without CVS) are made for the first ``eval_subset`` train
images only, which is where every variant's mIoU is measured.
"""

from __future__ import annotations

import itertools
import os

import jax
import ml_collections
import numpy as np

from pmm_jax import crf, distributed, notebook_utils, pseudo_masks
from pmm_jax.data import pipeline
from pmm_jax.stages import common
from pmm_jax.workdir import Workdir


def variant_config(config, method: str) -> ml_collections.ConfigDict:
    """The ``pseudo_masks.generate`` config of one variant, from ``config.pseudo`` and the
    CRF backend ``config.crf.backend``."""
    cfg = pseudo_masks.default_config()
    p = config.pseudo
    cfg.method = method
    cfg.alpha, cfg.t, cfg.s, cfg.official_minmax = p.alpha, p.t, p.s, p.official_minmax
    cfg.num_classes = config.data.num_classes
    cfg.num_workers = p.num_workers or None
    cfg.crf.update(p.crf.to_dict())
    cfg.crf.backend = crf.config_backend(config)  # config.crf.backend: pydensecrf | jax
    return cfg


def records(config, wd: Workdir, ids: set[str] | None):
    """``(id, image, cams)`` of every train image, optionally only ``ids``, in dataset order.

    Every process sees the same records; ``pseudo_masks.generate`` then makes the masks of
    records ``i, i + n, ...`` on process ``i`` of ``n``, so each mask is computed once and the
    eval subset (the first images) is spread over all processes too.
    """
    remaining = None if ids is None else len(ids)
    for ex in common.examples(config, wd, "train", all_processes=True):
        if remaining == 0:
            return  # every wanted id was yielded: stop decoding the rest of the split
        if ids is None or ex["id"] in ids:
            if remaining is not None:
                remaining -= 1
            yield ex["id"], ex["image"], os.path.join(wd.cams("train"), f"{ex['id']}.npy")


def subset_ids(config, wd: Workdir) -> list[str]:
    """The first ``eval_subset`` train ids in dataset order (all processes agree)."""
    first = itertools.islice(common.examples(config, wd, "train", all_processes=True),
                             config.pseudo.eval_subset)
    return [ex["id"] for ex in first]


def summary_images(config, wd: Workdir, ids: list[str], variants: list[str]
                   ) -> dict[str, np.ndarray]:
    """TensorBoard pictures (tag ``pseudo/<id>``): image, each variant's mask, ground truth."""
    pictures = {}
    for ex in notebook_utils.examples(config, wd.root, "train", ids=ids):
        masks = notebook_utils.mask_pictures(wd.root, ex["id"], ex["mask"], variants=variants)
        pictures[f"pseudo/{ex['id']}"] = notebook_utils.strip([ex["image"], *masks.values()])
    return pictures


def run(config, wd: Workdir) -> dict:
    subset = subset_ids(config, wd)
    num_train = pipeline.num_examples(config.data.name, common.split_name(config, "train"),
                                      common.data_dir(config, wd))
    variants = list(dict.fromkeys([config.pseudo.train_on, *config.pseudo.variants]))
    stats, mious = {}, {}
    for method in variants:
        wanted = None if method == config.pseudo.train_on else set(subset)
        out_dir = wd.pseudo_masks(method, "train")
        stats[method] = pseudo_masks.generate(
            records(config, wd, wanted), out_dir, variant_config(config, method),
            num_workers=config.pseudo.num_workers or None,
            process_index=jax.process_index(), process_count=jax.process_count(),
            total=len(subset) if wanted else num_train)
        stats[method]["per_process"] = distributed.gather_ints(
            {k: stats[method][k] for k in ("written", "skipped", "failed")})
        distributed.barrier(f"pseudo-{method}-written")  # the mIoU reads every process's masks
        mious[method] = common.miou(config, wd, "train", common.mask_reader(out_dir), ids=subset)
    if distributed.is_main():
        common.write_images(wd.log_dir("pseudo"), summary_images(
            config, wd, subset[:common.NUM_SUMMARY_IMAGES], variants))
    return {"pseudo_mask_miou": {m: r["miou"] for m, r in mious.items()},
            "pseudo_mask_per_class": {m: r["per_class"] for m, r in mious.items()},
            "subset_size": len(subset), "generation": stats}
