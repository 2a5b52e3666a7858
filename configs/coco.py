"""COCO 2014 (train / val) with the paper's settings: 81 contiguous classes, no cyclic step.

    python -m pmm_jax.data.prepare --dataset=coco --manual_dir=~/downloads/coco --data_dir=~/tfds
    python -m pmm_jax.main --config=configs/coco.py --workdir=WORKDIR --config.data.data_dir=~/tfds

Label space: the paper and WSSS_MMSeg use COCO's 91 ids (background + category ids 1..90,
"one background and 10 invalid"; num_classes=91 in its PSPNet configs) and ignore the 10
unused ids in test. The 81 contiguous classes here are those 91 ids without the unused ones,
renumbered, so their mIoU is exactly the 91-id mIoU with the unused ids ignored
(pmm_jax/scoring.py, tests/test_coco_eval.py); score 91-id masks directly with
`python -m pmm_jax.evaluate --num_classes=91 --class_names=coco91`.

ImageNet weights are those of configs/voc.py (same backbones, same keys
--config.cls.model.init_from and --config.seg.model.init_from); download and convert commands:
README.md, "ImageNet weights".
"""

import importlib.util
import os

import ml_collections


def _voc():
    """The configs/voc.py module, loaded by path so this file works from any directory."""
    spec = importlib.util.spec_from_file_location(
        "voc_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_sweep(name: str) -> list[dict]:
    """The same ablation sweeps as configs/voc.py (``alpha``, ``cvs_s``, ``pus_mode``, ``pus``)."""
    return _voc().get_sweep(name)


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """The paper's COCO config; ``variant="rehearsal"`` (``--config=configs/coco.py:rehearsal``)
    shrinks its sizes as configs/voc.py's ``rehearsal`` does (docs/rehearsal.md)."""
    if variant not in ("paper", "rehearsal"):
        raise ValueError(f"configs/coco.py: unknown variant {variant!r}; use 'paper' or 'rehearsal'")
    voc = _voc()
    c = voc.get_config()
    c.data.update(dict(name="coco2014_wsss/contiguous", class_names="coco", num_classes=81,
                       train_split="train", val_split="val", eval_pad_to=(640, 640)))
    # Multi-crop CAM inference as on VOC; the official COCO run trains its classifier without
    # rough masks ("simplify and speed up training"), so cls.multicrop.rough_masks stays "".
    c.cls.update(dict(batch_size=8, lr=0.01, num_steps=20 * 82783 // 8))
    # Pseudo-masks are scored on all of COCO train (82,783 images), the split they are made for.
    # Every variant is one more CRF pass over train; the paper reports only PPMG on COCO, so
    # --config.pseudo.variants=ppmg (or eval_subset=N, the first N images) saves that time.
    c.pseudo.update(dict(eval_split="train", eval_subset=0))
    c.seg.update(dict(batch_size=64, lr=0.01, min_lr=5e-5, num_steps=40000, ckpt_every=4000,
                      eval_every=4000))
    c.seg.pus.update(dict(beta=0.8, kappa=0.8))
    c.cycle.num_cycles = 0
    return voc.rehearsal(c) if variant == "rehearsal" else c
