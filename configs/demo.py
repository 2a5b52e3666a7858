"""The demo: the whole PMM pipeline on the bundled synthetic dataset, on a laptop CPU.

    python -m pmm_jax.main --config=configs/demo.py --workdir=/tmp/pmm_demo

Sized to finish in minutes on a 2-core CPU (see README). ``get_config("tiny")`` is the
``runlocal``-style variant the tests run end to end in seconds.
"""

import ml_collections

# PMM's multi-crop scales: 0.75 to 3.0 in steps of 0.25.
MULTICROP_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)


def _resnet(widths, blocks, strides, dilations, stem_width):
    return ml_collections.ConfigDict(dict(
        name="resnet", stem_width=stem_width, widths=widths, blocks=blocks, strides=strides,
        dilations=dilations, block="basic"))


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
    """Returns the demo config; ``variant`` is "demo" or "tiny" (``--config=configs/demo.py:tiny``)."""
    if variant not in ("demo", "tiny"):
        raise ValueError(f"configs/demo.py: unknown variant {variant!r}; use 'demo' or 'tiny'")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "cls,cam,pseudo,seg,cycle,eval"
    c.allow_random_init = True  # the demo models train from random weights
    c.compute_dtype = "float32"  # or "bfloat16" / "auto" (pmm_jax/training/precision.py)
    # XLA programs cached on disk ("" = off, "workdir" = WORKDIR/xla_cache, or a folder):
    # recurring programs (the cyclic round's train step, every segmenter's test-time program)
    # and resumed runs are not compiled again (pmm_jax.main.enable_compilation_cache).
    # (tiny: off; the test suite sets JAX_COMPILATION_CACHE_DIR, and its two-process run must
    # compile in step: a cached process reaches gloo's collectives far ahead of its peer.)
    c.compilation_cache = "" if tiny else "workdir"
    # Modules imported before the config is checked, which register methods from outside
    # the package (comma-separated; pmm_jax/registry.py).
    c.plugins = ""

    c.data = ml_collections.ConfigDict(dict(
        name=f"synthetic_wsss/{variant}",
        data_dir="",  # "" = WORKDIR/tfds
        class_names="synthetic",
        num_classes=6,  # including background
        train_split="train",
        val_split="val",
        eval_pad_to=None,  # (H, W) for datasets of varying image size; None = fixed-size split
        shuffle_buffer=None,  # None = the whole shard
    ))

    backbone = (_resnet((8, 16, 16, 32), (1, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2), 8) if tiny else
                _resnet((16, 32, 64, 64), (1, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2), 16))

    c.cls = ml_collections.ConfigDict(dict(
        # No dropout: SEAM's 0.5 channel dropout on 4096 channels would switch off half of
        # this small backbone's 64 (measured: CAM mIoU 23% with 0.5, 28% without).
        model=ml_collections.ConfigDict(dict(backbone=backbone, dropout=0.0, remat=False)),
        batch_size=16 if tiny else 32,
        crop_size=48 if tiny else 96,
        scale_range=(0.9, 1.1),
        num_steps=12 if tiny else 300,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        log_every=4 if tiny else 50,
        ckpt_every=4 if tiny else 200,
        # PMM's multi-crop training (docs/multicrop.md), off while rough_masks is "": PMM's
        # tiles (`crop`, `stride`: the paper's 448/300 relative to ~500-pixel VOC images,
        # scaled to these images) at one of `scales`, labelled from rough masks.
        multicrop=ml_collections.ConfigDict(dict(
            rough_masks="", scales=MULTICROP_SCALES, crop=32 if tiny else 64,
            stride=21 if tiny else 43)),
    ))

    c.cam = ml_collections.ConfigDict(dict(
        method="multiscale",  # or "multicrop" (PMM's multi-crop inference, docs/multicrop.md)
        scales=(1.0,) if tiny else (1.0, 1.5),
        flip=True,
        batch_size=16 if tiny else 40,
        # method="multicrop": tiles as in cls.multicrop, `tile_batch` tiles per jitted step.
        multicrop=ml_collections.ConfigDict(dict(
            scales=MULTICROP_SCALES, crop=32 if tiny else 64, stride=21 if tiny else 43,
            tile_batch=32)),
    ))

    # Dense CRF implementation wherever a CRF runs (pseudo-masks, segmentation test time with
    # eval.crf, cyclic masks): "pydensecrf" (host process pool; fastest on a CPU) or "jax"
    # (pmm_jax.masks.dense_crf_jax, jitted, in the main process; 30-160x faster on a GPU). docs/crf.md.
    c.crf = ml_collections.ConfigDict(dict(backend="pydensecrf"))

    c.pseudo = ml_collections.ConfigDict(dict(
        variants=("baseline", "crf_cvs", "ppmg_no_cvs", "ppmg"),
        train_on="ppmg",
        eval_split="train",  # the dataset split whose images and ground truth score the masks
        eval_subset=16 if tiny else 200,  # only its first N images (a quick score; 0 = all)
        alpha=11.0,
        t=0.05,
        s=0.3,
        official_minmax=False,
        num_workers=0,  # 0 = all cores
        crf=ml_collections.ConfigDict(dict(
            gauss_sxy=3.0, gauss_compat=10.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
            bilateral_compat=10.0, iterations=10)),
    ))

    c.seg = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(
            backbone=backbone, bins=(1, 2, 3, 6), channels=16 if tiny else 64,
            dropout=0.1, aux_channels=8 if tiny else 32,
            # Start from the cls stage's backbone (same config), as WSSS segmenters start from
            # a pretrained one; the demo has no ImageNet weights.
            init_from_cls=True,
            # True recomputes backbone activations in the backward pass (less memory, same
            # results; pmm_jax/models/remat.py); the demo's activations are small.
            remat=False)),
        aux_weight=0.4,
        runs=("ce", "pus"),
        pus=ml_collections.ConfigDict(dict(mode="clamp", beta=0.5, kappa=0.5, reduction="all")),
        batch_size=16,
        crop_size=48 if tiny else 96,
        scale_range=(0.9, 1.1),
        num_steps=12 if tiny else 200,
        # 0.05 for the demo: of 0.02 / 0.05 / 0.1 (seed 0, 300 steps, CE) it gave the best val
        # mIoU (31.2 / 31.8 / 31.2 % in one plain pass; README).
        lr=0.02 if tiny else 0.05,
        momentum=0.9,
        weight_decay=5e-4,
        decay_1d=True,  # mmseg's SGD: BN scales/offsets and biases decayed too (configs/voc.py)
        log_every=4 if tiny else 50,
        ckpt_every=4 if tiny else 200,
    ))

    c.cycle = ml_collections.ConfigDict(dict(num_cycles=1, source="pus", loss="ce"))

    # Test-time pipeline (pmm_jax.segmentation.inference), also used for the cyclic masks: the
    # paper's dense CRF on the softmax, at one scale and without the flip in the demo (seed 0,
    # CE segmenter: one plain pass 31.8 % val mIoU, three scales + flip without the CRF 32.2 %,
    # the CRF 38.2 %, flip + CRF 38.3 %: the flip is not worth its time here); the tiny variant
    # runs all of it (sliding window, two scales, flip, the CRF in this process) so the tests
    # cover it.
    c.eval = ml_collections.ConfigDict(dict(
        rule="mmseg", batch_size=16 if tiny else 40,
        sliding_window=(32, 24) if tiny else None, scales=(0.75, 1.0) if tiny else (1.0,),
        flip=tiny, crf=True, crf_workers=1 if tiny else 0))
    return c


def get_sweep(name: str) -> list[dict]:
    """Sweeps over this config for ``launch/sweep.py``: a list of override dicts per run."""
    sweeps = {
        "alpha": [{"pseudo.alpha": a} for a in (8.0, 11.0)],
        "cvs_s": [{"pseudo.s": s} for s in (0.0, 0.3, 0.6)],
        "pus": [{"seg.pus.beta": b, "seg.pus.kappa": b} for b in (0.3, 0.5, 0.8)],
        # Seed-to-seed spread: the seed sets the classifier's and segmenters' initialisation,
        # dropout and the training data order and augmentation (the dataset itself is fixed).
        "seed": [{"seed": s} for s in (0, 1, 2)],
    }
    if name not in sweeps:
        raise ValueError(f"configs/demo.py: unknown sweep {name!r}; known: {sorted(sweeps)}")
    return sweeps[name]
