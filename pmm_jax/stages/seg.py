"""Stage ``seg``: train PSPNet segmenters on the pseudo-masks, and predict with them.

One segmenter per entry of ``config.seg.runs``: ``ce`` (plain cross-entropy, the control)
and ``pus`` (the Pretended Under-fitting Strategy loss of ``config.seg.pus``). Both start
from the same initial weights (``initial_model``: seeded, the backbone from ``init_from`` or,
with ``config.seg.model.init_from_cls``, from the cls stage's classifier).
``train_segmenter`` and ``predict_split`` are shared with the ``cycle`` and ``eval`` stages.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from pmm_jax import drawing, models
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.models.pspnet import upsample_logits
from pmm_jax.segmentation import inference, pus
from pmm_jax.stages import cls, common
from pmm_jax import scoring
from pmm_jax.training import checkpoints, distributed, precision, trainer

if TYPE_CHECKING:  # TensorFlow: imported where data is read (the benchmarks import stages)
    from pmm_jax.data.dataset import Dataset


def build_model(config, seed: int = 0, *, num_classes: int | None = None) -> nnx.Module:
    """The configured segmenter of ``num_classes`` classes (the dataset's
    ``Dataset.num_classes``; None: ``config.data.num_classes``, for callers without a dataset
    such as bench/), randomly initialised (every run starts from these weights), its backbone
    loaded from ``config.seg.model.init_from`` (a ``pmm_jax.convert`` checkpoint, e.g.
    ImageNet weights) when set; it computes in ``config.compute_dtype``."""
    model = models.build_segmenter(config.seg.model, num_classes or config.data.num_classes,
                                   models.init_rngs(seed))
    if config.seg.model.get("init_from"):
        models.load_pretrained(model.backbone, config.seg.model.init_from,
                               arch=config.seg.model.backbone.name)
    return precision.set_compute_dtype(model, precision.config_dtype(config))


def initial_model(config, wd: Workdir, num_classes: int) -> nnx.Module:
    """The segmenter of ``num_classes`` classes a training run starts from: ``build_model``
    seeded with ``config.seed``, its backbone then overwritten with the ``cls`` stage's
    trained classifier backbone (every parameter and BN statistic) when
    ``config.seg.model.init_from_cls`` is set."""
    if config.seg.model.get("init_from_cls") and config.seg.model.get("init_from"):
        raise ValueError("config.seg.model.init_from and config.seg.model.init_from_cls are both "
                         "set; choose one starting point for the segmenter backbone")
    model = build_model(config, config.seed, num_classes=num_classes)
    if config.seg.model.get("init_from_cls"):
        load_cls_backbone(config, wd, model, num_classes)
    return model


def load_cls_backbone(config, wd: Workdir, model: nnx.Module, num_classes: int) -> nnx.Module:
    """Copies the backbone of the ``cls`` checkpoint in ``wd`` into ``model.backbone``.

    The stand-in for an ImageNet backbone where there is none (the synthetic demo): the
    classifier saw the same images. ValueError when the two backbones differ (the error lists
    the mismatched weights); FileNotFoundError when stage cls has not run.
    """
    ckpt_dir = wd.ckpt_dir("cls")
    classifier = checkpoints.restore_model(
        cls.build_model(config, num_classes=num_classes), ckpt_dir, step=config.cls.num_steps,
        hint="config.seg.model.init_from_cls needs the classifier: " + common.made_by("cls"))
    return models.copy_weights(
        classifier.backbone, model.backbone, what=f"the cls backbone in {ckpt_dir}",
        hint="config.seg.model.init_from_cls needs config.seg.model.backbone to build the same "
             "network as config.cls.model.backbone (set init_from_cls=False otherwise)")


def loss_fn(model, batch, rngs, *, mode: str, beta: float, kappa: float, reduction: str,
            aux_weight: float):
    """Decode-head loss + ``aux_weight`` x auxiliary-head loss, each its own PUS warm-up test."""
    out = model(batch["image"], rngs=rngs)
    size = batch["mask"].shape[1:3]
    head_loss = functools.partial(pus.pus_loss, labels=batch["mask"], mode=mode, beta=beta,
                                  kappa=kappa, reduction=reduction)
    main = head_loss(upsample_logits(out["logits"], size))
    aux = head_loss(upsample_logits(out["aux_logits"], size))
    return main + aux_weight * aux, {"main_loss": main, "aux_loss": aux}


def run_loss(config, loss: str):
    """The loss function of a run: ``ce`` (no PUS) or ``pus`` (config.seg.pus)."""
    if loss not in ("ce", "pus"):
        raise ValueError(f"unknown segmenter loss {loss!r}; use 'ce' or 'pus'")
    p = config.seg.pus
    return functools.partial(loss_fn, mode="none" if loss == "ce" else p.mode, beta=p.beta,
                             kappa=p.kappa, reduction=p.reduction,
                             aux_weight=config.seg.aux_weight)


def predict_labels(model, batch) -> jax.Array:
    """Per-pixel argmax labels ``[B, H, W]`` at input resolution (uint8)."""
    logits = upsample_logits(model(batch["image"])["logits"], batch["image"].shape[1:3])
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# Compiled once per model structure and input shape, shared by every caller.
jitted_predict_labels = nnx.jit(predict_labels)


def mask_summary(model, batch) -> dict:
    """TensorBoard images: input, training mask and prediction side by side (``model`` in
    eval mode; its forward pass jitted, compiled once per run instead of op by op)."""
    pred = np.asarray(jax.device_get(jitted_predict_labels(model, {"image": batch["image"][:4]})))
    images = drawing.denormalize(batch["image"][:4])
    target = drawing.colorize_mask(batch["mask"][:4])
    return {"image_mask_prediction": np.concatenate(
        [images, target, drawing.colorize_mask(pred)], axis=2)}


def _path_names(path) -> tuple[str, ...]:
    """A parameter's pytree key path as strings (without nnx's trailing ``value``)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def frozen_param_labels(model: nnx.Module) -> dict[tuple[str, ...], bool]:
    """``{parameter path: frozen}``: True under one of ``model.backbone.frozen_prefixes`` (the
    backbone's ``frozen_stages``, mmseg's ``requires_grad=False`` parameters)."""
    prefixes = set(getattr(getattr(model, "backbone", None), "frozen_prefixes", ()))
    labels = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        names = _path_names(path)
        labels[names] = len(names) > 2 and names[0] == "backbone" and names[1] in prefixes
    return labels


def make_optimizer(config, model: nnx.Module):
    """mmseg's SGD with poly decay (``config.seg``); returns ``(tx, schedule)``.

    As WSSS_MMSeg's ``SGD(lr, momentum, weight_decay)`` over every parameter, the weight decay
    reaches BatchNorm scales and offsets and conv biases too; ``config.seg.decay_1d=False``
    (absent: True) decays only the kernels. Parameters of the backbone's frozen stages
    (``frozen_prefixes``) get no update at all (no gradient step, momentum or weight decay),
    as mmseg's ``frozen_stages`` (``requires_grad=False``: PyTorch's SGD skips them); with
    none frozen ``tx`` is exactly ``trainer.sgd_poly``'s.
    """
    cfg = config.seg
    tx, schedule = trainer.sgd_poly(cfg.lr, cfg.num_steps, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay,
                                    end_lr=cfg.get("min_lr", 0.0),
                                    decay_1d=cfg.get("decay_1d", True))
    labels = frozen_param_labels(model)
    if any(labels.values()):
        label_tree = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if labels[_path_names(path)] else "train", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label_tree)
    return tx, schedule


def train_segmenter(config, wd: Workdir, data: Dataset, run: str, mask_dir: str,
                    loss: str) -> None:
    """Trains (or resumes) segmenter ``run`` on the masks in ``mask_dir`` (mmseg's
    augmentation when ``config.seg.augment == "mmseg"``: ``Dataset.train_batches``)."""
    cfg = config.seg
    eval_every = cfg.get("eval_every", 0) if data.has_split("val") else 0  # no val: last step
    ckpt_dir = wd.ckpt_dir(f"seg/{run}")
    start = checkpoints.latest_step(ckpt_dir) or 0
    batches = data.train_batches(
        cfg, "config.seg.batch_size", seed=config.seed, start_step=start, mask_dir=mask_dir,
        mask_producer="the 'pseudo' stage (or 'cycle' for cyclic masks)")
    common.warn_random_init(config, "seg")
    model = initial_model(config, wd, data.num_classes)
    tx, schedule = make_optimizer(config, model)
    trainer.train(model, run_loss(config, loss), batches, tx,
                  num_steps=cfg.num_steps, ckpt_dir=ckpt_dir, log_dir=wd.log_dir(f"seg/{run}"),
                  seed=config.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                  lr_schedule=schedule, image_summary_fn=mask_summary, desc=f"seg {run}",
                  eval_fn=keep_best(config, wd, data, run) if eval_every else None,
                  eval_every=eval_every)


def best_dir(wd: Workdir, run: str) -> str:
    """Where ``config.seg.eval_every`` keeps run's best-val checkpoint (and ``best.json``)."""
    return wd.ckpt_dir(f"seg/{run}/best")


def val_miou(config, data: Dataset, model) -> float:
    """mIoU of ``model`` on the val split, or its first ``config.seg.val_subset`` images when
    > 0, with config.eval's test-time pipeline (all processes)."""
    source = "the segmenter being trained, in its periodic validation (config.seg.eval_every)"
    # config.eval, config.crf.backend
    predict = inference.predictor(model, config, source=source)
    num_classes = data.num_classes
    cm = np.zeros((num_classes, num_classes), np.int64)
    for batch in data.eval_batches("val", config.eval.batch_size, "config.eval.batch_size",
                                   subset=config.seg.get("val_subset", 0)):
        labels = predict(batch)
        for i in np.flatnonzero(batch["valid"]):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            cm += scoring.confusion_matrix(labels[i, :h, :w], batch["mask"][i, :h, :w],
                                            num_classes)
    if jax.process_count() > 1:
        cm = np.asarray(multihost_utils.process_allgather(cm)).sum(axis=0)
    return float(scoring.iou_from_confusion(cm, rule=config.eval.rule)[1])


def keep_best(config, wd: Workdir, data: Dataset, run: str):
    """``eval_fn`` for ``trainer.train``: val mIoU every ``config.seg.eval_every`` steps; the
    best model so far is saved to ``best_dir`` with ``best.json`` {step, miou} (mmseg's
    ``save_best``), which survives a resumed run."""
    directory, record = best_dir(wd, run), best_record(wd, run)

    def eval_fn(step: int, model) -> None:
        miou = val_miou(config, data, model)
        best = safe_io.read_json(record)["miou"] if os.path.exists(record) else -1.0
        if distributed.is_main():
            subset = config.seg.get("val_subset", 0)
            images = f"first {subset} val images" if subset else "val"
            print(f"seg {run} step {step}: mIoU {100 * miou:.2f} on {images} "
                  f"(best {100 * max(best, miou):.2f})", flush=True)
        if miou > best:
            checkpoints.save_model(model, directory, step)
            if distributed.is_main():
                safe_io.write_json(record, {"step": step, "miou": miou})
        distributed.barrier(f"seg-{run}-best-{step}")

    return eval_fn


def trained_by(run: str) -> str:
    """The stage that trains segmenter ``run``: 'cycle' for cyclic runs, else 'seg'."""
    return "cycle" if run.startswith("cycle") else "seg"


def best_record(wd: Workdir, run: str) -> str:
    """``best.json`` ({step, miou}) of the checkpoint in :func:`best_dir`."""
    return os.path.join(os.path.dirname(best_dir(wd, run)), "best.json")


def segmenter_checkpoint(config, wd: Workdir, run: str) -> tuple[str, int]:
    """Segmenter ``run``'s checkpoint folder and step: its best-val one when
    ``config.seg.eval_every`` kept one (the step ``best.json`` records), else its final one
    (``config.seg.num_steps``)."""
    record = best_record(wd, run)
    if config.seg.get("eval_every", 0) and os.path.exists(record):
        return best_dir(wd, run), int(safe_io.read_json(record)["step"])
    return wd.ckpt_dir(f"seg/{run}"), config.seg.num_steps


def load_segmenter(config, wd: Workdir, run: str, num_classes: int) -> nnx.Module:
    """Segmenter ``run`` (``num_classes`` classes) restored from exactly the checkpoint of
    :func:`segmenter_checkpoint`."""
    directory, step = segmenter_checkpoint(config, wd, run)
    return checkpoints.restore_model(build_model(config, num_classes=num_classes), directory,
                                     step=step, hint=f"segmenter '{run}': "
                                     + common.made_by(trained_by(run)))


def predict_split(config, wd: Workdir, data: Dataset, run: str, split: str, out_dir: str,
                  stage: str = "eval") -> int:
    """Writes segmenter ``run``'s predicted mask of every image in ``split`` to ``out_dir``.

    Each process predicts its shard; images whose PNG already exists are skipped. Returns
    how many this process wrote, once every process has written its files. ``stage`` (the
    caller) is named, with the segmenter, when its predictions are not finite.
    """
    model = load_segmenter(config, wd, run, data.num_classes)
    source = (f"stage '{stage}': segmenter '{run}' ({segmenter_checkpoint(config, wd, run)[0]}, "
              f"trained by stage '{trained_by(run)}') on {split}")
    # config.eval, config.crf.backend
    predict = inference.predictor(model, config, source=source)
    key = "config.eval.batch_size"
    batches = data.eval_batches(split, config.eval.batch_size, key)
    total = data.num_eval_batches(split, config.eval.batch_size, key)
    safe_io.remove_stale_temps(out_dir)
    written = 0
    for batch in tqdm.tqdm(batches, desc=f"predict {run} {split}", unit="batch", total=total,
                           disable=not distributed.is_main()):
        paths = {i: os.path.join(out_dir, f"{batch['id'][i].decode()}.png")
                 for i in np.flatnonzero(batch["valid"])}
        todo = [i for i, path in paths.items() if not os.path.exists(path)]
        # One computation over every process's devices: all join while any has work left.
        if not distributed.any_process(bool(todo)):
            continue
        labels = predict(batch)
        for i in todo:
            height, width = int(batch["height"][i]), int(batch["width"][i])
            safe_io.write_mask(paths[i], labels[i, :height, :width])
            written += 1
    distributed.barrier(f"predict-{run}-{split}-written")  # readers need every process's files
    return written


def run(config, wd: Workdir, data: Dataset) -> dict:
    mask_dir = wd.pseudo_masks(config.pseudo.train_on, "train")
    for loss in config.seg.runs:
        train_segmenter(config, wd, data, loss, mask_dir, loss)
    return {"runs": list(config.seg.runs), "num_steps": config.seg.num_steps}
