"""Segmentation metrics: confusion matrices, IoU rules, the CAM threshold curve; the eval CLI.

Conventions: rows of a confusion matrix are ground truth, columns predictions; pixels whose
ground truth is the ignore label (255) are not counted. Two mean-IoU rules exist because the
two official code bases differ:

* ``"mmseg"`` (WSSS_MMSeg, mmsegmentation 0.8): IoU = TP / (TP + FP + FN), averaged over the
  classes whose union is non-zero; a class predicted but absent from the ground truth counts
  as 0.
* ``"pmm"`` (PMM ``pipeline/evaluation.py``): classes absent from the ground truth are dropped
  from the mean even when they were predicted.

On the full VOC val set every class occurs in the ground truth and the two rules agree.

Ignored classes (``ignore_classes``; COCO's 91-id space: :data:`IGNORED_CLASSES`): ids of
the label space that no annotation uses, e.g. the 10 unused COCO category ids
(``constants.COCO_UNUSED_IDS``) of the 91 classes WSSS_MMSeg evaluates COCO with. The rule:

* they never enter the mean, whatever the rule and whether or not they are predicted;
* they must never occur in the ground truth (``evaluate_dirs`` raises, naming the file);
* a pixel predicted as one is simply wrong: a false negative of its true class (which loses
  IoU), a false positive of no class that is averaged.

So mIoU over the 91 ids with the unused ones ignored equals mIoU over the 81 contiguous
classes of the same masks renumbered (``coco2014_wsss/contiguous``, what ``configs/coco.py``
trains and evaluates; a network with 81 outputs cannot predict an unused id at all). The
official code (mmseg 0.8 ``mean_iou`` + ``nanmean`` over 91 classes) drops an unused id only
while its union is empty: were one predicted, it would count as IoU 0 in the mean.

CLI::

    python -m pmm_jax.evaluate --pred_dir=P --gt_dir=G --num_classes=21 \
        [--rule=mmseg|pmm] [--out_json=F] [--class_names=voc|synthetic|coco|coco91] \
        [--ignore_classes=I,J] [--ids=ID_LIST]

``--ids`` scores only the ids listed in a file (e.g. ``VOC2012/ImageSets/Segmentation/val.txt``
with ``--gt_dir=VOC2012/SegmentationClass``, which holds train and val).

``--class_names=coco91`` (91-id COCO masks, ``--num_classes=91``) ignores the unused ids.
A bad flag or file (a missing folder, a corrupt or non-label PNG, a class list of the wrong
length, an ignored class that is not an index, an unwritable ``--out_json``) ends the CLI
with a one-paragraph ``error:`` line naming it and exit status 1.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from pmm_jax.constants import CLASS_NAMES, COCO_UNUSED_IDS, IGNORE_LABEL
from pmm_jax.files import safe_io

if TYPE_CHECKING:
    import jax

RULES = ("mmseg", "pmm")

# Classes of a named label space that are always left out of the mean (see the docstring).
IGNORED_CLASSES = {"coco91": COCO_UNUSED_IDS}


def ignored_classes(class_names: str | None) -> tuple[int, ...]:
    """The ignored classes of a label space named as in ``constants.CLASS_NAMES`` (none for
    unnamed spaces and those without unused ids)."""
    return tuple(IGNORED_CLASSES.get(class_names, ()))

# Background threshold of CAM-only masks that never looks at ground truth: the root m of
# (1 - m) ** 11 = m, where the paper's background (section 3.1, alpha = 11) equals the
# strongest class score; 0.1556..., inside the official 0.05-0.19 sweep.
DEFAULT_CAM_BG_THRESHOLD = 0.1556


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Pixel counts of (ground truth, prediction) pairs.

    Args:
        pred: predicted labels, any shape.
        gt: ground-truth labels, the shape of ``pred``.
        num_classes: K, background included.
        ignore_label: ground-truth value whose pixels are skipped.

    Returns:
        ``[K, K]`` int64 counts, rows ground truth, columns prediction.

    Raises:
        ValueError: on different shapes, or a value outside ``0..K-1`` (other than a skipped
            pixel) in either array: a wrong ``num_classes`` or a corrupt file, never dropped.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    keep = gt != ignore_label
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    for name, values in (("ground truth", g), ("prediction", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = np.unique(values[(values < 0) | (values >= num_classes)])
            raise ValueError(f"{name} has labels {bad.tolist()} outside 0..{num_classes - 1}")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def confusion_matrix_jnp(pred: jax.Array, gt: jax.Array, num_classes: int,
                         valid: jax.Array | None = None,
                         ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """jit-able :func:`confusion_matrix` for on-device accumulation.

    With a batch sharded over devices, jit sums the shards and returns one replicated
    matrix. Unlike :func:`confusion_matrix` it cannot raise under jit: pixels with a label
    outside ``0..K-1`` (and ``gt == ignore_label``) are not counted. int32 counts hold up to
    2**31 pixels per call; accumulate across calls on the host in int64. (JAX is imported
    here so the numpy paths and the CLI start without it.)

    Args:
        pred: predicted labels, any shape.
        gt: ground-truth labels, the shape of ``pred``.
        num_classes: K, background included.
        valid: broadcastable to ``gt`` (e.g. ``[B, 1, 1]`` for padded batch rows); False
            removes pixels. None keeps all.
        ignore_label: ground-truth value whose pixels are skipped.

    Returns:
        ``[K, K]`` int32 counts summed over every axis, rows ground truth.
    """
    import jax.numpy as jnp

    pred = jnp.asarray(pred).astype(jnp.int32)
    gt = jnp.asarray(gt).astype(jnp.int32)
    keep = (gt != ignore_label) & (gt >= 0) & (gt < num_classes) & (pred >= 0) & (pred < num_classes)
    if valid is not None:
        keep = keep & jnp.broadcast_to(valid, gt.shape)
    index = jnp.where(keep, gt * num_classes + pred, 0).reshape(-1)
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(
        keep.reshape(-1).astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray, rule: str = "mmseg",
                       ignore_classes: Iterable[int] = ()) -> tuple[np.ndarray, float]:
    """Per-class IoU and the mean IoU of a confusion matrix.

    Args:
        cm: ``[K, K]`` counts, rows ground truth (:func:`confusion_matrix`).
        rule: ``"mmseg"`` (leave out classes with an empty union) or ``"pmm"`` (leave out
            classes absent from the ground truth).
        ignore_classes: always left out (e.g. the unused COCO ids; their predictions stay
            false negatives of the true classes, see the module docstring).

    Returns:
        ``(iou, miou)``: ``[K]`` float64 with NaN for the classes left out, and their mean
        (NaN when no class is left).
    """
    if rule not in RULES:
        raise ValueError(f"unknown IoU rule {rule!r}; expected one of {RULES}")
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt_count = cm.sum(axis=1)
    union = gt_count + cm.sum(axis=0) - tp
    included = union > 0 if rule == "mmseg" else gt_count > 0
    included[list(ignore_classes)] = False
    iou = np.full(cm.shape[0], np.nan)
    iou[included] = tp[included] / union[included]
    miou = float(iou[included].mean()) if included.any() else float("nan")
    return iou, miou


def cam_labels(cams: Mapping[int, np.ndarray], shape: Sequence[int], bg_threshold: float) -> np.ndarray:
    """Label map from CAMs alone: background where the strongest CAM is <= ``bg_threshold``.

    Ties go to background and to the lower class, as in the official evaluation (argmax over
    ``[threshold, cams...]``). No CAM at all gives all background.

    Args:
        cams: 0-based foreground class -> ``[H, W]`` scores.
        shape: ``(H, W)`` of the label map.
        bg_threshold: the background score.

    Returns:
        ``[H, W]`` uint8: 0 background, else the strongest class + 1.
    """
    score, label = _strongest_class(cams, shape)
    return np.where(score > bg_threshold, label, 0).astype(np.uint8)


def cam_threshold_curve(pairs: Iterable[tuple[Mapping[int, np.ndarray], np.ndarray]],
                        thresholds: Sequence[float], num_classes: int,
                        rule: str = "mmseg") -> dict[float, float]:
    """mIoU of :func:`cam_labels` for each background threshold.

    The official curve is ``thresholds = [0.05, 0.06, ..., 0.19]``; picking its best point
    looks at ground truth, which :data:`DEFAULT_CAM_BG_THRESHOLD` does not.

    Args:
        pairs: ``(cams, gt)`` per image, read once (may be a generator of files).
        thresholds: background thresholds; each keeps its own confusion matrix.
        num_classes: K, background included.
        rule: the IoU rule (:func:`iou_from_confusion`).

    Returns:
        ``{threshold: mIoU}``.
    """
    thresholds = [float(t) for t in thresholds]
    totals = {t: np.zeros((num_classes, num_classes), np.int64) for t in thresholds}
    for cams, gt in pairs:
        gt = np.asarray(gt)
        score, label = _strongest_class(cams, gt.shape)
        for t in thresholds:
            totals[t] += confusion_matrix(np.where(score > t, label, 0), gt, num_classes)
    return {t: iou_from_confusion(cm, rule)[1] for t, cm in totals.items()}


def _strongest_class(cams: Mapping[int, np.ndarray], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel the highest CAM score and its label (class + 1); -inf and 0 without CAMs."""
    shape = tuple(shape)
    if not cams:
        return np.full(shape, -np.inf, np.float32), np.zeros(shape, np.int64)
    classes = sorted(cams)
    stack = np.stack([np.asarray(cams[c], np.float32) for c in classes])
    if stack.shape[1:] != shape:
        raise ValueError(f"CAM shape {stack.shape[1:]} != label shape {shape}")
    best = stack.argmax(axis=0)
    return np.take_along_axis(stack, best[None], 0)[0], np.asarray(classes)[best] + 1


def read_ids(path: str) -> list[str]:
    """The ids of an id list file (one per line, e.g. VOC's ``ImageSets/Segmentation/val.txt``;
    blank lines ignored, duplicates kept once); ValueError naming the file if it has none."""
    try:
        with open(path) as f:
            ids = list(dict.fromkeys(line.strip() for line in f if line.strip()))
    except OSError as err:
        raise ValueError(f"--ids={path}: cannot read the id list: {err}") from err
    if not ids:
        raise ValueError(f"--ids={path}: the id list is empty")
    return ids


def evaluate_dirs(pred_dir: str, gt_dir: str, num_classes: int, rule: str = "mmseg",
                  ignore_classes: Iterable[int] = (), ids: Sequence[str] | None = None) -> dict:
    """Scores every ``<id>.png`` of ``gt_dir``, or only ``ids``, against ``pred_dir/<id>.png``.

    Args:
        pred_dir: folder of predicted label PNGs.
        gt_dir: folder of ground-truth label PNGs.
        num_classes: K, background included.
        rule: the IoU rule (:func:`iou_from_confusion`).
        ignore_classes: classes left out of the mean; ground truth must not hold them.
        ids: the ids to score (None: every PNG of ``gt_dir``), so that ``gt_dir`` may hold
            more than the scored images (VOC's ``SegmentationClass`` has train and val);
            files of other ids are not read.

    Returns:
        ``{"confusion", "iou", "miou", "num_images"}``.

    Raises:
        ValueError: naming the folder or file: a missing folder, a listed id without ground
            truth, missing predictions (listed: a partial folder would give a plausible but
            wrong mIoU), an unreadable mask, or ground truth holding an ignored class.
    """
    ignore_classes = sorted({int(c) for c in ignore_classes})
    for flag, folder in (("gt_dir", gt_dir), ("pred_dir", pred_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"--{flag}={folder}: "
                             + ("not a directory" if os.path.exists(folder) else "does not exist"))
    if ids is None:
        ids = sorted(f[:-4] for f in os.listdir(gt_dir) if f.endswith(".png"))
        if not ids:
            raise ValueError(f"{gt_dir}: no ground-truth .png files")
    else:
        no_gt = [i for i in ids if not os.path.exists(os.path.join(gt_dir, f"{i}.png"))]
        if no_gt:
            shown = ", ".join(no_gt[:20]) + (f", ... ({len(no_gt)} in all)" if len(no_gt) > 20 else "")
            raise ValueError(f"{gt_dir}: no ground truth for {len(no_gt)} listed ids: {shown}")
    missing = [i for i in ids if not os.path.exists(os.path.join(pred_dir, f"{i}.png"))]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(f"{pred_dir}: no prediction for {len(missing)} ground-truth ids: {shown}")
    cm = np.zeros((num_classes, num_classes), np.int64)
    for image_id in ids:
        pred_path = os.path.join(pred_dir, f"{image_id}.png")
        gt_path = os.path.join(gt_dir, f"{image_id}.png")
        pred, gt = safe_io.read_mask(pred_path), safe_io.read_mask(gt_path)  # errors name the file
        try:
            image_cm = confusion_matrix(pred, gt, num_classes)
        except ValueError as err:
            raise ValueError(f"{pred_path} vs {gt_path}: {err}") from err
        in_gt = [c for c in ignore_classes if image_cm[c].sum()]
        if in_gt:
            raise ValueError(f"{gt_path}: ground truth has ignored (unused) class ids {in_gt}; "
                             "wrong label space or a corrupt mask")
        cm += image_cm
    iou, miou = iou_from_confusion(cm, rule, ignore_classes)
    return {"confusion": cm, "iou": iou, "miou": miou, "num_images": len(ids)}


def class_names_for(num_classes: int, names: str | None = None) -> tuple[str, ...]:
    """Display names: a named list from constants.CLASS_NAMES, else by size, else indices."""
    if names is not None:
        if names not in CLASS_NAMES:
            raise ValueError(f"unknown class-name list {names!r}; expected one of {sorted(CLASS_NAMES)}")
        chosen = CLASS_NAMES[names]
        if len(chosen) != num_classes:
            raise ValueError(f"--class_names={names} has {len(chosen)} classes, --num_classes={num_classes}")
        return tuple(chosen)
    for chosen in CLASS_NAMES.values():
        if len(chosen) == num_classes:
            return tuple(chosen)
    return tuple(str(i) for i in range(num_classes))


def format_table(iou: np.ndarray, miou: float, names: Sequence[str]) -> str:
    """Markdown table of per-class IoU in percent.

    Args:
        iou: ``[K]`` per-class IoU, NaN for a class left out (shown as ``-``).
        miou: the mean IoU, the last row.
        names: ``K`` class names, the first column.

    Returns:
        The table's lines joined by newlines.
    """
    lines = ["| class | IoU (%) |", "| --- | ---: |"]
    for name, value in zip(names, iou):
        lines.append(f"| {name} | {'-' if np.isnan(value) else f'{100 * value:.2f}'} |")
    lines.append(f"| **mIoU** | **{100 * miou:.2f}** |")
    return "\n".join(lines)
