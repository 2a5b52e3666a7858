"""Your own images: the paper's method on a folder of tagged images (docs/datasets.md).

    python -m pmm_jax.main --config=configs/folder.py --config.data.folder=DIR --workdir=W \
        --config.cls.model.init_from=RESNET38_DIR --config.seg.model.init_from=RES2NET_DIR

The folder sets the classes (``classes.txt`` or the names in ``labels.csv``): nothing here
needs to match it. ``get_config("tiny")`` (``--config=configs/folder.py:tiny``) runs every
stage in a few minutes on a 2-core CPU from random weights, to try the commands (and for the
tests); its mIoUs are near chance.

Everything not commented below is configs/voc.py's recipe (the paper's settings). What
differs, and why, for a dataset nobody has tuned for:
"""

import importlib.util
import os

import ml_collections

# configs/demo.py's tiny backbone (ResNet, basic blocks, output stride 8).
TINY_BACKBONE = dict(name="resnet", stem_width=8, widths=(8, 16, 16, 32), blocks=(1, 1, 1, 1),
                     strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), block="basic")


def _voc():
    """The configs/voc.py module (the paper's recipe this one starts from), loaded by path so
    this file works from any directory."""
    spec = importlib.util.spec_from_file_location(
        "voc_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "voc.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """The folder config; ``variant`` is "paper" (GPU, ImageNet weights) or "tiny"."""
    if variant not in ("paper", "tiny"):
        raise ValueError(f"configs/folder.py: unknown variant {variant!r}; use 'paper' or 'tiny'")
    c = _voc().get_config("paper")
    c.data = ml_collections.ConfigDict(dict(
        name="folder_wsss",
        # The folder of images/, labels.csv, ... (required: --config.data.folder=DIR).
        folder="",
        # Where its dataset is built ("" = WORKDIR/tfds); runs may share one.
        data_dir="",
        # Photos of any size: the longer side is shrunk to this when building (0 = keep).
        # VOC's images are at most 500 pixels, the size the recipe's crops (448, 512) and
        # sliding window are made for; a 12-megapixel photo would make every step slow.
        max_side=512,
        # Class names and count come from the folder (the dataset handle); 0 / "" here.
        class_names="",
        num_classes=0,
        train_split="train",
        val_split="val",  # absent when the folder has no masks: mIoUs are then "n/a"
        eval_pad_to=None,  # the folder's largest image, rounded up to a multiple of 8
        shuffle_buffer=2048,
    ))
    # Multi-crop CAMs need rough masks of a first model (a second classifier run,
    # docs/multicrop.md); the single-model multi-scale CAMs (SEAM's) keep one pass.
    c.cam.method = "multiscale"
    c.cam.scales = (0.5, 1.0, 1.5, 2.0)
    # Pseudo-masks are scored on the train images that have a mask (none: "n/a"), not on
    # VOC's train list.
    c.pseudo.eval_split = "train_masked"
    # Both segmenters: on an untried dataset, plain CE against PUS says whether PUS helps
    # there; `pmm_jax.predict` then takes the better one by val mIoU (PUS without val).
    c.seg.runs = ("ce", "pus")
    # A user's dataset is smaller than VOC's 10,582 images: validate and keep the best
    # checkpoint twice as often (each validation is short on a small val).
    c.seg.eval_every = 1000
    # Training lengths stay VOC's (cls: 20 epochs of 10,582 images at batch 16; seg: 20k
    # steps): enough for a folder of that size or smaller; for N train images, about
    # 20 * N / 16 classifier steps is the paper's schedule (--config.cls.num_steps).
    # Three test scales instead of six: predictions on new images (`pmm_jax.predict`) are
    # the point here, and 3 x flip is half the time of 6 x flip for most of the gain.
    c.eval.scales = (0.75, 1.0, 1.25)
    return tiny(c) if variant == "tiny" else c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the folder config ``c`` to run every stage in minutes on a CPU from random
    weights (configs/demo.py's tiny sizes): images shrunk to 64 pixels, tiny ResNets,
    12 steps, one small CAM scale, the test-time pipeline's every part (sliding window, two
    scales, flip, CRF in this process) so the commands exercise all of it."""
    c.allow_random_init = True
    c.compute_dtype = "float32"
    c.compilation_cache = ""
    c.data.max_side = 64
    c.data.shuffle_buffer = None
    backbone = ml_collections.ConfigDict(TINY_BACKBONE)
    c.cls = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(backbone=backbone, dropout=0.0, remat=False)),
        batch_size=8, crop_size=48, scale_range=(0.9, 1.1), num_steps=12, lr=0.1,
        momentum=0.9, weight_decay=5e-4, log_every=4, ckpt_every=12,
        multicrop=c.cls.multicrop))
    c.cls.multicrop.update(dict(crop=32, stride=21))
    c.cam.update(dict(scales=(1.0,), flip=True, batch_size=8))
    c.cam.multicrop.update(dict(crop=32, stride=21, tile_batch=32))
    c.pseudo.update(dict(num_workers=1))
    c.seg = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(
            backbone=ml_collections.ConfigDict(TINY_BACKBONE), bins=(1, 2, 3, 6), channels=16,
            dropout=0.1, aux_channels=8, init_from_cls=True, remat=False)),
        # One run (PUS) and no periodic validation: the tiny run's time goes to covering
        # every stage once (the cycle's segmenter is the second run predict chooses from).
        aux_weight=0.4, runs=("pus",), pus=c.seg.pus, batch_size=8, crop_size=48,
        scale_range=(0.9, 1.1), num_steps=12, lr=0.02, momentum=0.9, weight_decay=5e-4,
        log_every=4, ckpt_every=12, eval_every=0, val_subset=0))
    c.eval.update(dict(batch_size=8, sliding_window=(32, 24), scales=(0.75, 1.0), flip=True,
                       crf=True, crf_workers=1))
    return c
