"""PASCAL VOC 2012 (train_aug / val) with the paper's settings.

    python -m pmm_jax.data.prepare --dataset=voc --manual_dir=~/downloads/voc --data_dir=~/tfds
    python -m pmm_jax.main --config=configs/voc.py --workdir=WORKDIR --config.data.data_dir=~/tfds

``get_config("rehearsal")`` (``--config=configs/voc.py:rehearsal``) is the same recipe with
every size shrunk (networks, steps, batches, crops, scale lists) so that all stages run in
minutes on a CPU, from random weights: a rehearsal of the commands, not of the figures
(docs/rehearsal.md). Every backbone size key is in the config, so a single size can also be
changed on the command line (``--config.cls.model.backbone.width_div=16``).

Values follow ../shared/pmm-reference.md (the official code's settings). Batch sizes are
global (split over processes and devices).
"""

import ml_collections

from pmm_jax.training import pod_scale

# PMM's multi-crop scales (training and inference): 0.75 to 3.0 in steps of 0.25.
MULTICROP_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)
# cls.model.remat / seg.model.remat: run every backbone block under nnx.remat (activations
# recomputed in the backward pass; same results, pmm_jax/models/remat.py). On by default: it
# halves XLA's temp memory of the full-size train steps (CPU compile, bench/step_memory.py,
# docs/models.md "Memory": ResNet38-d SEAM step 1.21 -> 0.58 GiB, PSPNet ResNetV1c-101 step
# 1.37 -> 0.50 GiB, both at crop 224, batch 2), for about one extra backbone forward pass
# per step. --config.cls.model.remat=False to trade back.
REMAT = True


def get_config(variant: str = "paper") -> ml_collections.ConfigDict:
    """The paper's VOC config; ``variant="rehearsal"`` shrinks its sizes (``rehearsal``);
    ``"pod<N>"`` (``--config=configs/voc.py:pod64``) is the recipe on N chips when they do not
    divide its batches (``pmm_jax.training.pod_scale``, docs/pod_scale.md)."""
    chips = pod_scale.pod_chips(variant)
    if chips:
        return pod_scale.scale_to_chips(get_config("paper"), chips)
    if variant not in ("paper", "rehearsal"):
        raise ValueError(f"configs/voc.py: unknown variant {variant!r}; use 'paper', "
                         "'rehearsal' or 'pod<chips>' (e.g. pod64)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "cls,cam,pseudo,seg,cycle,eval"
    # Training the classifier or segmenter with an empty init_from (random weights) is refused
    # unless this is True; ImageNet weights: see README.md, section 'ImageNet weights'.
    c.allow_random_init = False
    # Compute dtype of every model (pmm_jax/training/precision.py, docs/models.md): "auto" = bfloat16 on
    # a GPU/TPU, float32 on a CPU; params, BN statistics and optimizer state stay float32.
    c.compute_dtype = "auto"
    # XLA programs cached on disk ("" = off, "workdir" = WORKDIR/xla_cache, or a folder):
    # recurring programs (the cyclic round's train step, every segmenter's test-time program)
    # and resumed runs are not compiled again (pmm_jax.main.enable_compilation_cache).
    c.compilation_cache = "workdir"
    # Modules imported before the config is checked, which register methods from outside
    # the package (comma-separated; pmm_jax/registry.py).
    c.plugins = ""

    c.data = ml_collections.ConfigDict(dict(
        name="voc2012_wsss",
        data_dir="",  # where `pmm_jax.data.prepare` wrote the dataset ("" = WORKDIR/tfds)
        class_names="voc",
        num_classes=21,
        train_split="train_aug",
        val_split="val",
        eval_pad_to=(512, 512),  # VOC images are at most 500x500
        shuffle_buffer=2048,
    ))

    # CAM classifier: SEAM (pmm_jax.cams.seam: CAM head + PCM, its losses and four parameter groups)
    # on wide ResNet38-d (paper: batch 16, lr 0.02, 20 epochs, crop 448). ImageNet weights
    # (download locations: README.md, "ImageNet weights"): the MXNet file SEAM/PMM use,
    # `python -m pmm_jax.convert --arch=resnet38 --src=ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    # --out=DIR` (numpy only; a .pth works too), then --config.cls.model.init_from=DIR
    # (init_from="" trains from scratch). The paper's best CAMs
    # use ScaleNet101 (PMM: no dropout before the head): in a config file set
    # c.cls.model.backbone = dict(name="scalenet101", structure="PATH/scalenet101.json") and
    # c.cls.model.dropout = 0.0 (convert scalenet101.pth from PMM's or ScaleNet's downloads with
    # --arch=scalenet101 --structure=PATH).
    # official_momentum=True reproduces the official SGD momentum of 5e-4 (see pmm_jax/cams/seam.py).
    c.cls = ml_collections.ConfigDict(dict(
        method="seam",
        model=ml_collections.ConfigDict(dict(
            # Size keys at the official network's values (width_div divides every channel).
            backbone=ml_collections.ConfigDict(dict(
                name="resnet38", width_div=1, blocks=(3, 3, 6, 3))), dropout=0.5,
            init_from="", remat=REMAT)),
        official_momentum=False,
        batch_size=16,
        crop_size=448,
        scale_range=(0.9, 1.1),
        num_steps=20 * 10582 // 16,
        lr=0.02,
        momentum=0.9,
        weight_decay=5e-4,
        log_every=50,
        ckpt_every=1000,
        # PMM's multi-crop training (docs/multicrop.md): a tile (crop 448, stride 300) at a random
        # scale of 0.75..3.0, labelled by the 10% rule from rough masks of a first model. Off
        # while rough_masks is "" (the first model: random-scale crops); then
        # `python -m pmm_jax.pseudo_masks --method=rough --run_config=configs/voc.py
        # --workdir=FIRST_RUN --run_config.data.data_dir=~/tfds` and --config.cls.multicrop.rough_masks=FIRST_RUN/rough_masks/train.
        multicrop=ml_collections.ConfigDict(dict(
            rough_masks="", scales=MULTICROP_SCALES, crop=448, stride=300)),
    ))

    # CAMs: PMM's multi-crop inference (tiles of crop 448, stride 300, scales 0.75..3.0, each
    # tile also flipped; tile_batch tiles per jitted step over all devices). The first model
    # of the multi-crop recipe uses method="multiscale" (SEAM's: whole image at `scales`).
    c.cam = ml_collections.ConfigDict(dict(
        method="multicrop", scales=(0.5, 1.0, 1.5, 2.0), flip=True, batch_size=8,
        multicrop=ml_collections.ConfigDict(dict(
            scales=MULTICROP_SCALES, crop=448, stride=300, tile_batch=16))))

    # Dense CRF implementation wherever a CRF runs (pseudo-masks, segmentation test time with
    # eval.crf, cyclic masks): "pydensecrf" (host process pool; fastest on a CPU) or "jax"
    # (pmm_jax.masks.dense_crf_jax, jitted, in the main process; 30-160x faster on a GPU). docs/crf.md.
    c.crf = ml_collections.ConfigDict(dict(backend="pydensecrf"))

    c.pseudo = ml_collections.ConfigDict(dict(
        variants=("baseline", "crf_cvs", "ppmg_no_cvs", "ppmg"),
        train_on="ppmg",
        # Pseudo-mask mIoU is scored on the dataset split eval_split (VOC `train`: 1,464 images,
        # VOC ground truth, all inside train_aug), as the paper's; eval_subset=N > 0 scores
        # only its first N (0 = all of it).
        eval_split="train",
        eval_subset=0,
        alpha=11.0,
        t=0.05,
        s=0.3,
        official_minmax=False,
        num_workers=0,
        crf=ml_collections.ConfigDict(dict(
            gauss_sxy=3.0, gauss_compat=10.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
            bilateral_compat=10.0, iterations=10)),
    ))

    # Segmenter: PSPNet (mmseg VOC settings: crop 512, batch 16, lr 0.005, 20k iterations).
    c.seg = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(
            # frozen_stages (mmseg's: -1 none, 0 stem, k stem + layer1..k; frozen parts get no
            # update and eval-mode BN). WSSS_MMSeg trains every stage of Res2Net, ScaleNet101 and
            # ResNet38 (-1); its ResNetV1c base config (configs/_base_/models/pspnet_r50-d8.py)
            # has frozen_stages=1: set 1 with name="resnet101".
            # Size keys at the official values; Res2Net101 and ResNetV1c-101 share them.
            backbone=ml_collections.ConfigDict(dict(
                name="res2net101", frozen_stages=-1, width_div=1, blocks=(3, 4, 23, 3))),
            # ImageNet weights (README.md, "ImageNet weights"): `python -m pmm_jax.convert
            # --arch=res2net101 --src=res2net101_v1b_26w_4s-0812c246.pth --out=DIR`, then
            # --config.seg.model.init_from=DIR (resnet101: resnet101_v1c-e67eebb6.pth)
            init_from="",
            # True: start the backbone from the cls stage's classifier (same backbone config
            # only); the demo's stand-in for ImageNet weights.
            init_from_cls=False,
            bins=(1, 2, 3, 6), channels=512, dropout=0.1, aux_channels=256, remat=REMAT)),
        aux_weight=0.4,
        runs=("pus",),
        pus=ml_collections.ConfigDict(dict(mode="clamp", beta=0.5, kappa=0.5, reduction="all")),
        batch_size=16,
        crop_size=512,
        # mmseg augmentation: rescale around img_scale by scale_range, crop 512 with
        # cat_max_ratio, flip, photometric distortion (pipeline.mmseg_train_batches)
        augment="mmseg",
        img_scale=(2048, 512),
        scale_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        num_steps=20000,
        lr=0.005,
        min_lr=1e-4,  # mmseg poly: (lr - min_lr) * (1 - k / num_steps) ** 0.9 + min_lr
        momentum=0.9,
        weight_decay=5e-4,
        # True: the weight decay reaches every parameter (BN scales/offsets, conv biases), as
        # mmseg's SGD over all parameters; False decays only kernels (docs/fidelity.md).
        decay_1d=True,
        log_every=50,
        ckpt_every=2000,
        eval_every=2000,  # val mIoU (config.eval pipeline); the best checkpoint is kept and used
        # The first N val images in that validation (0 = all): each validation costs the
        # test-time pipeline, CRF included, per image (bench/recipe.py projects it).
        val_subset=0,
    ))

    c.cycle = ml_collections.ConfigDict(dict(num_cycles=1, source="pus", loss="ce"))
    # Test-time pipeline (pmm_jax.segmentation.inference; WSSS_MMSeg's test_cfg): sliding window
    # 512/480, six scales x flip softmax-averaged, then the segmentation dense CRF. It also
    # writes the cyclic pseudo-masks. crf_workers: CRF processes (0 = all cores).
    c.eval = ml_collections.ConfigDict(dict(
        rule="mmseg", batch_size=8, sliding_window=(512, 480),
        scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, crf=True, crf_workers=0))
    return rehearsal(c) if variant == "rehearsal" else c


def rehearsal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks the sizes of paper config ``c`` (VOC's or COCO's) in place and returns it.

    Kept: every stage, SEAM on ResNet38-d, multi-crop CAMs (tiles of 448 with stride 300,
    flipped), all four pseudo-mask variants with per-class CRF, PSPNet on Res2Net101 with
    mmseg augmentation and PUS, the cyclic round(s) of ``c``, and the test-time pipeline
    (sliding window 512/480, several scales, flip, dense CRF) with its best-val checkpoint.
    Shrunk: backbone widths (/32 ResNet38-d, /16 Res2Net) and depths (one block per stage),
    head widths, steps, batches, training crops, and the scale lists (two multi-crop CAM
    scales instead of ten, two test-time scales instead of six). From random weights
    (``allow_random_init``): its mIoUs are near chance.
    """
    c.allow_random_init = True
    c.cls.model.backbone.update(dict(width_div=32, blocks=(1, 1, 1, 1)))
    c.cls.update(dict(batch_size=4, crop_size=96, num_steps=2, log_every=1, ckpt_every=2))
    c.cam.update(dict(batch_size=4, scales=(0.5, 1.0)))
    c.cam.multicrop.update(dict(scales=(0.75, 1.25), tile_batch=8))
    c.seg.model.backbone.update(dict(width_div=16, blocks=(1, 1, 1, 1)))
    c.seg.model.update(dict(channels=32, aux_channels=16))
    c.seg.update(dict(batch_size=4, crop_size=128, num_steps=2, log_every=1, ckpt_every=2,
                      eval_every=2, val_subset=1))
    c.eval.update(dict(batch_size=4, scales=(0.75, 1.25)))
    return c


def get_sweep(name: str) -> list[dict]:
    """The paper's ablations as sweeps for ``launch/sweep.py`` (one override dict per run):
    ``alpha`` (background power), ``cvs_s`` (CVS strength s; 0 = no smoothing), ``pus_mode``
    (Table 3: no PUS / pow / ignore / clamp) and ``pus`` (beta = kappa)."""
    sweeps = {
        "alpha": [{"pseudo.alpha": a} for a in (8.0, 11.0, 14.0)],
        "cvs_s": [{"pseudo.s": s} for s in (0.0, 0.3, 0.6)],
        "pus_mode": [{"seg.pus.mode": m} for m in ("none", "pow", "ignore", "clamp")],
        "pus": [{"seg.pus.beta": b, "seg.pus.kappa": b} for b in (0.3, 0.5, 0.8)],
    }
    if name not in sweeps:
        raise ValueError(f"configs/voc.py: unknown sweep {name!r}; known: {sorted(sweeps)}")
    return sweeps[name]
