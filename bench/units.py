"""One unit of every costly stage of the recipe, timed at a config's shapes on this device.

What ``bench.recipe`` multiplies into projected hours and ``bench.suite`` reports per image: a
classifier train step, the CAMs of one image (multi-crop or multi-scale, as the ``cam`` stage
runs them), the PPMG pseudo-mask of one image per CRF backend, a segmenter train step, and
test-time inference of one image. Models are built as their stages build them, computing in
the config's ``compute_dtype``, optionally shrunk (:class:`Size`). A config is anything with
the attribute access of an ``ml_collections.ConfigDict`` (``bench/config_values.py`` builds
the configs as plain attribute dicts where ml_collections is missing, as on the GPU image).
Every unit is timed after one untimed call (compilation), as the best of ``repeats``. Imports
jax, flax and numpy at load; TensorFlow never (no input pipeline runs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import resource
import tempfile
import time

import jax
import numpy as np
from flax import nnx

IMAGE_HW = (375, 500)  # a typical VOC image (height, width)
PRESENT_CLASSES = (8, 14)  # the pseudo-mask image's labels (0-based foreground: cat, person)
CRF_BACKENDS = ("pydensecrf", "jax")


@dataclasses.dataclass(frozen=True)
class Size:
    """How far the networks and resolutions are reduced (all 1 / False: the paper's sizes)."""
    width_div: int = 1
    res_div: int = 1
    shallow: bool = False

    @property
    def full(self) -> bool:
        return self.width_div == 1 and self.res_div == 1 and not self.shallow

    def px(self, n: int) -> int:
        return max(1, int(round(n / self.res_div)))

    def label(self) -> str:
        if self.full:
            return "full size (the paper's shapes)"
        return (f"SHRUNK (widths / {self.width_div}, resolutions / {self.res_div}"
                f"{', one block per stage' if self.shallow else ''}): NOT the paper recipe's time")


def compute_dtype(config) -> str:
    """The configured compute precision on this device (``config.compute_dtype``, "auto"
    resolved by ``pmm_jax.training.precision``; float32 for configs without the key)."""
    from pmm_jax.training import precision

    return str(precision.config_dtype(config))


def in_compute_dtype(config, model):
    """``model`` computing in ``config.compute_dtype``, as the stages' ``build_model`` set it."""
    from pmm_jax.training import precision

    return precision.set_compute_dtype(model, precision.config_dtype(config))


def shrunk_backbone(cfg, size: Size) -> dict:
    """A backbone config dict with the widths and depth of ``size`` (unchanged at full size)."""
    cfg = dict(cfg)
    if size.full:
        return cfg
    w, name = size.width_div, cfg["name"]
    one = (1, 1, 1, 1)
    if name == "resnet38":
        cfg.update(width_div=w, **({"blocks": one} if size.shallow else {}))
    elif name == "scalenet101":
        cfg.update(width_div=w, **({"layers": one} if size.shallow else {}))
    elif name == "res2net101":
        # at least 3 planes: Res2Net's group width is planes * 26 // 64
        cfg.update(planes=tuple(max(3, p // w) for p in (64, 128, 256, 512)),
                   stem_width=max(2, 64 // w), **({"blocks": one} if size.shallow else {}))
    elif name in ("resnet50", "resnet101"):
        cfg.update(base_width=max(1, 64 // w), stem_width=max(2, 64 // w),
                   **({"blocks": one} if size.shallow else {}))
    else:
        raise ValueError(f"bench/recipe.py cannot shrink backbone {name!r}")
    return cfg


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def train_step_seconds(model, tx, loss_fn, batch: dict, repeats: int) -> float:
    """Seconds per step of the trainer's jitted, donated, sharded step."""
    from pmm_jax.training import sharding as shd
    from pmm_jax.training import trainer

    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    mesh = shd.make_mesh()
    holder = {"state": shd.replicate(state, mesh)}
    step = trainer.make_step(graphdef, loss_fn, 0, mesh)
    device_batch = shd.shard_batch(batch, mesh)

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    return best_time(run, repeats)


def classifier(config, size: Size):
    """The configured CAM classifier (as ``cams.classifier.build_model``, shrunk by ``size``)."""
    from pmm_jax import models
    from pmm_jax.cams import seam
    from pmm_jax.models.cam_classifier import CAMClassifier

    rngs = models.init_rngs(0)
    backbone = models.build_backbone(shrunk_backbone(config.cls.model.backbone, size), rngs,
                                     remat=models.remat_option(config.cls.model))
    num_foreground = config.data.num_classes - 1
    options = {k: v for k, v in config.cls.model.items()
               if k not in ("backbone", "init_from", *models.BACKBONE_OPTIONS)}
    if config.cls.get("method", "plain") == "seam":
        model = seam.SEAM(backbone, num_foreground, **options, rngs=rngs)
    else:
        model = CAMClassifier(backbone, num_foreground, dropout=options.get("dropout", 0.5), rngs=rngs)
    return in_compute_dtype(config, model)


def time_cls(config, size: Size, repeats: int) -> float:
    """Seconds per classifier train step at the configured crop and batch."""
    from pmm_jax.cams import seam
    from pmm_jax.cams.classifier import plain_loss
    from pmm_jax.training import optimizers

    model = classifier(config, size)
    cfg, crop = config.cls, size.px(config.cls.crop_size)
    if cfg.get("method", "plain") == "seam":
        tx, _ = seam.make_optimizer(model, cfg.lr, cfg.num_steps)
        loss_fn = seam.seam_loss
    else:
        tx, _ = optimizers.sgd_poly(cfg.lr, cfg.num_steps)
        loss_fn = plain_loss
    rng = np.random.default_rng(0)
    labels = np.zeros((cfg.batch_size, config.data.num_classes - 1), np.float32)
    labels[np.arange(cfg.batch_size), rng.integers(0, labels.shape[1], cfg.batch_size)] = 1
    batch = {"image": rng.normal(size=(cfg.batch_size, crop, crop, 3)).astype(np.float32),
             "labels": labels}
    return train_step_seconds(model, tx, loss_fn, batch, repeats)


def eval_batch(image: np.ndarray, pad_to, num_labels: int) -> dict:
    """A host eval batch holding ``image`` in row 0 of a canvas ``pad_to``, padded with invalid
    rows to the device count (only row 0 is real work for the CAM tiler)."""
    rows = jax.device_count()
    h, w = image.shape[:2]
    raw = np.zeros((rows, *pad_to, 3), np.uint8)
    raw[0, :h, :w] = image
    labels = np.zeros((rows, num_labels), np.float32)
    labels[0, list(PRESENT_CLASSES)] = 1
    return {"raw": raw, "labels": labels, "valid": np.arange(rows) == 0,
            "height": np.full(rows, h, np.int32), "width": np.full(rows, w, np.int32)}


def test_image(size: Size, seed: int = 0) -> np.ndarray:
    """A smooth random uint8 RGB image of VOC's 500x375 (divided by ``size.res_div``)."""
    h, w = size.px(IMAGE_HW[0]), size.px(IMAGE_HW[1])
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 16 + 2, w // 16 + 2, 3))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.01, h), np.linspace(0, coarse.shape[1] - 1.01, w)
    image = coarse[ys.astype(int)][:, xs.astype(int)] * 200 + rng.random((h, w, 3)) * 55
    return image.astype(np.uint8)


def time_cam(config, size: Size, repeats: int) -> float:
    """Seconds of multi-crop (or multi-scale) CAMs of one image, as the cam stage runs them."""
    from pmm_jax.cams import classifier as cams_classifier
    from pmm_jax.cams import multicrop_inference

    model = classifier(config, size)
    model.eval()
    mc = config.cam.multicrop
    pad = tuple(size.px(p) for p in config.data.eval_pad_to)
    batch = eval_batch(test_image(size), pad, config.data.num_classes - 1)
    devices = jax.device_count()
    tile_batch = max(devices, mc.tile_batch // devices * devices)

    predict = multicrop_inference.MultiCropCAM(
        model, cams_classifier.method(config).cam, scales=tuple(mc.scales), crop=size.px(mc.crop),
        stride=size.px(mc.stride), flip=bool(config.cam.flip), tile_batch=tile_batch)
    return best_time(lambda: predict(batch, [0]), repeats)


def cams_of(image: np.ndarray) -> dict[int, np.ndarray]:
    """Two overlapping smooth blobs, one CAM per present class (values in [0, 1])."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    cams = {}
    for k, (cy, cx) in zip(PRESENT_CLASSES, ((0.4, 0.35), (0.6, 0.65))):
        d = ((yy / h - cy) ** 2 + (xx / w - cx) ** 2) / 0.05
        cams[k] = np.exp(-d).astype(np.float32)
    return cams


def pydensecrf_available() -> bool:
    return importlib.util.find_spec("pydensecrf") is not None


def pseudo_cfg(config, method: str, backend: str):
    """``generator.generate``'s config of one variant (as ``stages.pseudo.variant_config``)."""
    from pmm_jax.masks import generator

    cfg = generator.default_config()
    p = config.pseudo
    cfg.method = method
    cfg.alpha, cfg.t, cfg.s, cfg.official_minmax = p.alpha, p.t, p.s, p.official_minmax
    cfg.num_classes = config.data.num_classes
    for key, value in p.crf.items():
        cfg.crf[key] = value
    cfg.crf.backend = backend
    return cfg


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children (pool workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_pseudo_masks(config, size: Size, backend: str, method: str, repeats: int) -> float:
    """Seconds per image of ``generator.generate`` with ``backend``, from the difference
    between three images and one so that pool start-up and compilation cancel: CPU seconds of
    every process for pydensecrf (one worker; the projection spreads them over a pool of every
    core, and CPU time barely moves with other load), wall seconds for the in-process jax CRF."""
    from pmm_jax.masks import generator

    image = test_image(size)
    cams = cams_of(image)
    cfg = pseudo_cfg(config, method, backend)
    clock = cpu_seconds if backend == "pydensecrf" else time.perf_counter

    def run(n: int, tag: str) -> float:
        with tempfile.TemporaryDirectory() as out_dir:
            records = [(f"{tag}{i}", image, cams) for i in range(n)]
            start = clock()
            generator.generate(records, out_dir, cfg, num_workers=1, process_index=0,
                                  process_count=1)
            return clock() - start

    run(1, "warm")
    times = []
    for r in range(repeats):
        three, one = run(3, f"a{r}_"), run(1, f"b{r}_")
        times.append((three - one) / 2 if three > one else three / 3)
    return min(times)


def segmenter(config, size: Size):
    """The configured PSPNet (``models.build_segmenter``, shrunk by ``size``)."""
    from pmm_jax import models

    cfg = dict(config.seg.model)
    cfg["backbone"] = shrunk_backbone(cfg["backbone"], size)
    cfg.pop("init_from", None)
    if not size.full:
        cfg.update(channels=max(2, cfg["channels"] // size.width_div),
                   aux_channels=max(2, cfg["aux_channels"] // size.width_div))
    return in_compute_dtype(config, models.build_segmenter(cfg, config.data.num_classes,
                                                           models.init_rngs(0)))


def seg_loss(config):
    """The seg stage's ``pus`` run loss (``config.seg.pus``)."""
    from pmm_jax.segmentation import losses

    return losses.run_loss(config, "pus")


def time_seg(config, size: Size, repeats: int, max_batch: int) -> tuple[float, int]:
    """``(seconds per step, timed batch)`` of the segmenter train step at the configured crop."""
    from pmm_jax.segmentation import segmenter as seg_model

    cfg = config.seg
    batch_size = min(cfg.batch_size, max_batch)
    batch_size = max(jax.device_count(), batch_size // jax.device_count() * jax.device_count())
    crop = size.px(cfg.crop_size)
    model = segmenter(config, size)
    tx, _ = seg_model.make_optimizer(config, model)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(batch_size, crop, crop, 3)).astype(np.float32),
             "mask": rng.integers(0, config.data.num_classes,
                                  (batch_size, crop, crop)).astype(np.int32)}
    return train_step_seconds(model, tx, seg_loss(config), batch, repeats), batch_size


def test_batch(config, size: Size) -> dict:
    """An eval batch of one image (rows padded to the device count) as the eval pipeline
    gives it: ImageNet-normalised ``image`` on the ``eval_pad_to`` canvas, ``raw`` for the CRF."""
    from pmm_jax.constants import IMAGENET_MEAN, IMAGENET_STD

    pad = tuple(size.px(p) for p in config.data.eval_pad_to)
    batch = eval_batch(test_image(size), pad, config.data.num_classes - 1)
    batch.pop("labels")
    batch["image"] = ((batch["raw"].astype(np.float32) - np.asarray(IMAGENET_MEAN, np.float32))
                      / np.asarray(IMAGENET_STD, np.float32))
    return batch


def time_test(config, size: Size, backends: list[str], repeats: int) -> dict[str, float]:
    """Seconds of the test-time pipeline on one image per CRF backend, as
    ``inference.Predictor`` runs it: the device part (``config.eval``: sliding window,
    scales, flip, softmax average; compiled once for all backends) plus the dense CRF of the
    averaged probabilities with each backend."""
    from pmm_jax.masks import dense_crf, dense_crf_jax
    from pmm_jax.segmentation import inference
    from pmm_jax.training import trainer

    eval_cfg = dict(config.eval)
    if eval_cfg.get("sliding_window"):
        eval_cfg["sliding_window"] = tuple(size.px(v) for v in eval_cfg["sliding_window"])
    predict = trainer.make_predict_fn(segmenter(config, size),
                                      inference.device_fn(eval_cfg))
    batch = test_batch(config, size)
    device_s = best_time(lambda: predict(batch), repeats)
    if not eval_cfg.get("crf"):
        return {b: device_s for b in backends}
    h, w = int(batch["height"][0]), int(batch["width"][0])
    probs = np.ascontiguousarray(np.asarray(predict(batch))[0, :h, :w].transpose(2, 0, 1))
    raw = np.ascontiguousarray(batch["raw"][0, :h, :w])
    params = dense_crf.SEGMENTATION_TEST_CRF
    run = {"pydensecrf": lambda: dense_crf.dense_crf(raw, probs, params),
           "jax": lambda: dense_crf_jax.dense_crf_padded(raw, probs[None], params)[0]}
    return {b: device_s + best_time(run[b], repeats) for b in backends}
