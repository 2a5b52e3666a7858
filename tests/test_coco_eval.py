"""COCO's 91-id label space in evaluation: the 10 unused category ids are ignored.

WSSS_MMSeg evaluates COCO over 91 classes (background + ids 1..90, "one background and 10
invalid" in the paper). Here, on masks the tests make: with the unused ids ignored, mIoU over
the 91 ids equals mIoU over the 81 contiguous classes of the same masks (what
configs/coco.py trains and evaluates); a prediction of an unused id is a miss of the true
class and adds no class to the mean; an unused id in the ground truth is an error naming the
file.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import configs
from pmm_jax import constants
from pmm_jax.files import safe_io
from pmm_jax import scoring as ev

REPO = pathlib.Path(__file__).resolve().parents[1]
USED_IDS = np.asarray((0,) + constants.COCO_CATEGORY_IDS)
UNUSED = constants.COCO_UNUSED_IDS


def to_contiguous(mask91: np.ndarray) -> np.ndarray:
    """91-id mask -> contiguous 0..80 (255 stays); unused ids must not occur."""
    table = np.full(256, -1, np.int64)
    table[USED_IDS] = np.arange(len(USED_IDS))
    table[255] = 255
    out = table[mask91]
    assert (out >= 0).all()
    return out.astype(np.uint8)


def make_masks(rng, n=4, shape=(21, 27), unused_predictions=0):
    """(gt, pred) pairs of 91-id masks over a few used classes, 255 void; ``pred`` has
    ``unused_predictions`` pixels per image predicted as unused ids."""
    classes = USED_IDS[[0, 1, 3, 17, 40, 80]]
    pairs = []
    for _ in range(n):
        gt = rng.choice(classes, shape).astype(np.uint8)
        gt[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.6, np.where(gt == 255, 0, gt),
                        rng.choice(classes, shape)).astype(np.uint8)
        flat = pred.reshape(-1)
        flat[rng.choice(flat.size, unused_predictions, replace=False)] = rng.choice(
            UNUSED, unused_predictions)
        pairs.append((gt, pred))
    return pairs


def write(pairs, root: pathlib.Path, convert=lambda m: m):
    for i, (gt, pred) in enumerate(pairs):
        safe_io.write_mask(str(root / "gt" / f"im{i}.png"), convert(gt))
        safe_io.write_mask(str(root / "pred" / f"im{i}.png"), convert(pred))
    return str(root / "pred"), str(root / "gt")


def brute_force_miou(pairs, classes) -> float:
    """Mean over ``classes`` with a non-empty union of TP / (gt + pred - TP), 255 skipped."""
    ious = []
    for c in classes:
        tp = sum(np.sum((g == c) & (p == c)) for g, p in pairs)
        gt = sum(np.sum(g == c) for g, _ in pairs)
        pred = sum(np.sum((p == c) & (g != 255)) for g, p in pairs)
        if gt + pred - tp:
            ious.append(tp / (gt + pred - tp))
    return float(np.mean(ious))


def test_coco_label_spaces_and_config():
    assert UNUSED == (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
    assert len(constants.COCO91_CLASSES) == 91 and constants.COCO91_CLASSES[90] == "toothbrush"
    used = tuple(n for i, n in enumerate(constants.COCO91_CLASSES) if i not in UNUSED)
    assert used == constants.COCO_CLASSES and len(used) == 81
    assert ev.ignored_classes("coco91") == UNUSED and ev.ignored_classes("coco") == ()
    data = configs.get_config("coco").data
    assert (data.name, data.num_classes, data.class_names) == (
        "coco2014_wsss/contiguous", 91 - len(UNUSED), "coco")


@pytest.mark.parametrize("rule", ["mmseg", "pmm"])
def test_91_id_miou_with_unused_ignored_equals_contiguous_miou(tmp_path, rule):
    pairs = make_masks(np.random.default_rng(0))
    miou91 = ev.evaluate_dirs(*write(pairs, tmp_path / "ids"), 91, rule, UNUSED)["miou"]
    contiguous = ev.evaluate_dirs(*write(pairs, tmp_path / "c", to_contiguous), 81, rule)
    assert miou91 == pytest.approx(contiguous["miou"], abs=1e-12)
    assert miou91 == pytest.approx(brute_force_miou(pairs, USED_IDS))
    assert np.isfinite(contiguous["iou"]).sum() == 6


def test_predicted_unused_ids_are_misses_and_never_enter_the_mean(tmp_path):
    pairs = make_masks(np.random.default_rng(1), unused_predictions=40)
    pred_dir, gt_dir = write(pairs, tmp_path)
    result = ev.evaluate_dirs(pred_dir, gt_dir, 91, "mmseg", UNUSED)
    assert np.isnan(result["iou"][list(UNUSED)]).all()
    assert result["confusion"][:, list(UNUSED)].sum() > 0  # they were predicted
    # Independent count: the used classes' IoU, the unused-id pixels lost by their true class.
    assert result["miou"] == pytest.approx(brute_force_miou(pairs, USED_IDS))
    # The official nanmean (no ignore list) would average a 0 for each predicted unused id.
    official = ev.evaluate_dirs(pred_dir, gt_dir, 91, "mmseg")
    predicted_unused = sum(1 for u in UNUSED if any((p == u).any() for _, p in pairs))
    assert predicted_unused and official["miou"] == pytest.approx(
        result["miou"] * 6 / (6 + predicted_unused))


def test_unused_id_in_ground_truth_is_an_error_naming_the_file(tmp_path):
    pairs = make_masks(np.random.default_rng(2), n=2)
    pairs[1][0][3, 4] = 45
    pred_dir, gt_dir = write(pairs, tmp_path)
    with pytest.raises(ValueError, match=r"im1\.png: ground truth has ignored \(unused\) class "
                                         r"ids \[45\]"):
        ev.evaluate_dirs(pred_dir, gt_dir, 91, "mmseg", UNUSED)


def test_cli_coco91_ignores_the_unused_ids(tmp_path):
    pairs = make_masks(np.random.default_rng(3), n=2, unused_predictions=10)
    pred_dir, gt_dir = write(pairs, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "pmm_jax.evaluate", f"--pred_dir={pred_dir}",
           f"--gt_dir={gt_dir}", "--num_classes=91", "--class_names=coco91",
           f"--out_json={tmp_path / 'r.json'}"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"ignored classes {list(UNUSED)}" in result.stdout
    assert "| unused-12 | - |" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ignored_classes"] == list(UNUSED)
    assert report["miou"] == pytest.approx(brute_force_miou(pairs, USED_IDS))
