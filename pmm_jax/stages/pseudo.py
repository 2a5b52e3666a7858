"""Stage ``pseudo``: pseudo-masks from the train split's CAMs, one folder per variant.

The variant named by ``config.pseudo.train_on`` (PPMG by default) is made for every train
image, because the segmenter trains on it; the other variants (the paper's Table 2 rows:
baseline CRF, CRF + CVS, PPMG without CVS) are made for the first ``eval_subset`` train
images only, which is where every variant's mIoU is measured.
"""

from __future__ import annotations

import os

import ml_collections

from pmm_jax import pseudo_masks
from pmm_jax.stages import common
from pmm_jax.workdir import Workdir


def variant_config(config, method: str) -> ml_collections.ConfigDict:
    """The ``pseudo_masks.generate`` config of one variant, from ``config.pseudo``."""
    cfg = pseudo_masks.default_config()
    p = config.pseudo
    cfg.method = method
    cfg.alpha, cfg.t, cfg.s, cfg.official_minmax = p.alpha, p.t, p.s, p.official_minmax
    cfg.num_classes = config.data.num_classes
    cfg.num_workers = p.num_workers or None
    cfg.crf.update(p.crf.to_dict())
    return cfg


def records(config, wd: Workdir, ids: set[str] | None):
    """``(id, image, cams)`` of this process's train images, optionally only ``ids``."""
    for ex in common.examples(config, wd, "train"):
        if ids is None or ex["id"] in ids:
            yield ex["id"], ex["image"], os.path.join(wd.cams("train"), f"{ex['id']}.npy")


def subset_ids(config, wd: Workdir) -> list[str]:
    """The first ``eval_subset`` train ids in dataset order (all processes agree)."""
    ids = [ex["id"] for ex in common.examples(config, wd, "train", all_processes=True)]
    return ids[:config.pseudo.eval_subset]


def run(config, wd: Workdir) -> dict:
    subset = subset_ids(config, wd)
    variants = list(dict.fromkeys([config.pseudo.train_on, *config.pseudo.variants]))
    stats, mious = {}, {}
    for method in variants:
        wanted = None if method == config.pseudo.train_on else set(subset)
        out_dir = wd.pseudo_masks(method, "train")
        stats[method] = pseudo_masks.generate(
            records(config, wd, wanted), out_dir, variant_config(config, method),
            num_workers=config.pseudo.num_workers or None, process_index=0, process_count=1,
            total=len(subset) if wanted else None)
        mious[method] = common.miou(config, wd, "train", common.mask_reader(out_dir), ids=subset)
    return {"pseudo_mask_miou": {m: r["miou"] for m, r in mious.items()},
            "pseudo_mask_per_class": {m: r["per_class"] for m, r in mious.items()},
            "subset_size": len(subset), "generation": stats}
