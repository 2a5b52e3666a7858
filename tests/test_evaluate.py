"""pmm_jax.evaluate: confusion matrices, the two IoU rules, the CAM threshold curve, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from pmm_jax.files import safe_io
from pmm_jax import scoring as ev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_confusion(pred, gt, k):
    cm = np.zeros((k, k), np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != 255:
            cm[g, p] += 1
    return cm


def random_pair(rng, shape, k, ignore_share=0.1):
    gt = rng.integers(0, k, shape).astype(np.uint8)
    gt[rng.random(shape) < ignore_share] = 255
    pred = np.where(rng.random(shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, k, shape))
    return pred.astype(np.uint8), gt


def test_confusion_matrix_matches_brute_force_and_ignores_255():
    rng = np.random.default_rng(0)
    pred, gt = random_pair(rng, (23, 31), 5)
    cm = ev.confusion_matrix(pred, gt, 5)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, brute_force_confusion(pred, gt, 5))
    assert cm.sum() == np.count_nonzero(gt != 255)


def test_confusion_matrix_rejects_out_of_range_labels():
    gt = np.array([[0, 1], [2, 255]])
    with pytest.raises(ValueError, match=r"prediction has labels \[7\]"):
        ev.confusion_matrix(np.array([[0, 1], [7, 0]]), gt, 3)
    with pytest.raises(ValueError, match=r"ground truth has labels \[5\]"):
        ev.confusion_matrix(np.zeros((2, 2), int), np.array([[0, 5], [1, 1]]), 3)
    with pytest.raises(ValueError, match="shape"):
        ev.confusion_matrix(np.zeros((2, 3), int), gt, 3)


def test_iou_rules():
    # Class 0: TP 3, FP 1, FN 1 -> 3/5. Class 1: in gt, never predicted -> 0.
    # Class 2: predicted once, absent from gt -> mmseg 0, pmm excluded. Class 3: nowhere.
    cm = np.array([[3, 0, 1, 0],
                   [1, 0, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
    iou, miou = ev.iou_from_confusion(cm, "mmseg")
    np.testing.assert_allclose(iou[:3], [0.6, 0.0, 0.0])
    assert np.isnan(iou[3]) and miou == pytest.approx(0.2)
    iou, miou = ev.iou_from_confusion(cm, "pmm")
    np.testing.assert_allclose(iou[:2], [0.6, 0.0])
    assert np.isnan(iou[2:]).all() and miou == pytest.approx(0.3)
    iou, miou = ev.iou_from_confusion(cm, "mmseg", ignore_classes=[1])
    assert np.isnan(iou[1]) and miou == pytest.approx(0.3)
    assert np.isnan(ev.iou_from_confusion(np.zeros((3, 3)), "mmseg")[1])
    with pytest.raises(ValueError, match="unknown IoU rule"):
        ev.iou_from_confusion(cm, "voc")


def test_jnp_confusion_equals_numpy_and_sums_a_sharded_batch():
    rng = np.random.default_rng(1)
    batch = [random_pair(rng, (16, 12), 6) for _ in range(4)]
    pred = np.stack([p for p, _ in batch])
    gt = np.stack([g for _, g in batch])
    valid = np.array([True, True, True, False])  # the last row is batch padding
    expected = sum(ev.confusion_matrix(p, g, 6) for p, g in batch[:3])

    fn = jax.jit(ev.confusion_matrix_jnp, static_argnums=2)
    np.testing.assert_array_equal(fn(pred[0], gt[0], 6), ev.confusion_matrix(pred[0], gt[0], 6))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(a, shard) for a in (pred, gt, valid[:, None, None])]
    cm = fn(*args[:2], 6, args[2])
    np.testing.assert_array_equal(np.asarray(cm), expected)
    # Labels outside 0..K-1 cannot raise under jit: they are not counted.
    out_of_range = fn(jnp.array([[9, 1]]), jnp.array([[1, 1]]), 6)
    assert int(out_of_range.sum()) == 1


def test_cam_labels_thresholds_with_ties_to_background():
    cams = {2: np.array([[0.1, 0.5], [0.2, 0.0]]), 0: np.array([[0.3, 0.5], [0.1, 0.0]])}
    labels = ev.cam_labels(cams, (2, 2), 0.2)
    np.testing.assert_array_equal(labels, [[1, 1], [0, 0]])  # 0.5 tie -> lower class; 0.2 -> bg
    np.testing.assert_array_equal(ev.cam_labels({}, (2, 3), 0.2), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        ev.cam_labels(cams, (3, 2), 0.2)


def test_cam_threshold_curve_matches_per_threshold_evaluation():
    rng = np.random.default_rng(2)
    pairs = []
    for _ in range(3):
        gt = np.zeros((20, 20), np.uint8)
        gt[5:15, 4:12] = 3
        gt[0, :] = 255
        cams = {2: np.clip((gt == 3) * 0.6 + rng.normal(0, 0.1, gt.shape), 0, 1),
                4: np.clip(rng.normal(0.05, 0.05, gt.shape), 0, 1)}
        pairs.append((cams, gt))
    thresholds = [0.05, 0.1, 0.15, 0.3]
    curve = ev.cam_threshold_curve(iter(pairs), thresholds, 6, rule="pmm")
    assert list(curve) == thresholds
    for t in thresholds:
        cm = sum(ev.confusion_matrix(ev.cam_labels(c, g.shape, t), g, 6) for c, g in pairs)
        assert curve[t] == pytest.approx(ev.iou_from_confusion(cm, "pmm")[1])
    assert curve[0.3] > curve[0.05]


def test_default_cam_threshold_is_where_the_paper_background_meets_the_class_score():
    m = ev.DEFAULT_CAM_BG_THRESHOLD
    assert abs((1 - m) ** 11 - m) < 1e-3 and 0.05 <= m <= 0.19


def test_cli_prints_table_writes_json_and_lists_missing_predictions(tmp_path):
    rng = np.random.default_rng(3)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    cm = np.zeros((6, 6), np.int64)
    for i in range(3):
        pred, gt = random_pair(rng, (10, 14), 6)
        safe_io.write_mask(str(pred_dir / f"im{i}.png"), pred)
        safe_io.write_mask(str(gt_dir / f"im{i}.png"), gt)
        cm += ev.confusion_matrix(pred, gt, 6)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "pmm_jax.evaluate", f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}",
           "--num_classes=6", "--rule=pmm", f"--out_json={tmp_path / 'r.json'}"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    iou, miou = ev.iou_from_confusion(cm, "pmm")
    assert "| kite |" in result.stdout and f"**{100 * miou:.2f}**" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["miou"] == pytest.approx(miou) and report["num_images"] == 3
    assert report["iou"]["ring"] == pytest.approx(iou[1])

    os.remove(pred_dir / "im1.png")
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "im1" in result.stderr and "no prediction" in result.stderr


def test_cli_bad_files_and_flags_are_one_paragraph_errors(tmp_path):
    """Each bad ground-truth file or flag ends the CLI with status 1 and an ``error:``
    paragraph naming it, never a traceback (nor, for a lossy or RGB label, a score)."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    labels = np.zeros((8, 10), np.uint8)
    labels[2:6, 3:8] = 2
    safe_io.write_mask(str(pred_dir / "a.png"), labels)
    safe_io.write_mask(str(gt_dir / "a.png"), labels)
    Image.fromarray(labels).save(tmp_path / "lossy.png", format="JPEG")
    Image.fromarray(np.stack([labels * 40] * 3, -1)).save(tmp_path / "rgb.png")
    noisy = np.random.default_rng(0).integers(0, 6, (16, 16)).astype(np.uint8)
    safe_io.write_mask(str(tmp_path / "noisy.png"), noisy)
    (tmp_path / "cut.png").write_bytes((tmp_path / "noisy.png").read_bytes()[:-40])
    safe_io.write_mask(str(tmp_path / "wrong.png"), np.full((8, 10), 30, np.uint8))
    (tmp_path / "report.json").mkdir()
    gt_file = str(gt_dir / "a.png")
    base = [f"--pred_dir={pred_dir}", f"--gt_dir={gt_dir}", "--num_classes=6"]
    # (flags, ground-truth file to put at gt/a.png first or None, what stderr must hold)
    cases = [
        ([f"--pred_dir={pred_dir}", f"--gt_dir={tmp_path / 'nope'}"], None,
         [f"--gt_dir={tmp_path / 'nope'}: does not exist"]),
        (base + ["--class_names=voc"], None, ["--class_names=voc has 21 classes, --num_classes=6"]),
        (base + ["--ignore_classes=1,x"], None, ["--ignore_classes: 'x' is not a class index"]),
        (base + ["--ignore_classes=6"], None, ["--ignore_classes: 6 is outside 0..5"]),
        (base + [f"--out_json={tmp_path / 'report.json'}"], None,
         [f"--out_json={tmp_path / 'report.json'}: cannot write the report"]),
        (base, "lossy.png", [f"{gt_file}: ", "the file is JPEG"]),
        (base, "rgb.png", [f"{gt_file}: ", "got mode RGB"]),
        (base, "cut.png", [f"{gt_file}: ", "truncated"]),
        (base, "wrong.png", [f"{gt_file}: ", "ground truth has labels [30]"]),
    ]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for args, gt_name, expected in cases:
        if gt_name:
            os.replace(tmp_path / gt_name, gt_file)
        result = subprocess.run([sys.executable, "-m", "pmm_jax.evaluate", *args], env=env,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert all(text in result.stderr for text in expected), (expected, result.stderr)
        # Only an unwritable report comes after the table; a bad input gives no score.
        assert ("mIoU" in result.stdout) == ("--out_json" in expected[0]), result.stdout


def test_class_names():
    assert ev.class_names_for(21)[15] == "person"
    assert ev.class_names_for(6, "synthetic")[1] == "ring"
    assert ev.class_names_for(4) == ("0", "1", "2", "3")
    with pytest.raises(ValueError, match="has 21 classes"):
        ev.class_names_for(6, "voc")


def test_id_list_scores_only_listed_ids_of_a_voc_folder(tmp_path):
    """VOC's SegmentationClass holds train and val: with --ids=val.txt only val is scored (the
    README's command, on a VOC tree layout), and each listed id needs ground truth."""
    rng = np.random.default_rng(5)
    voc = tmp_path / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    splits = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003", "2007_000004"]}
    cm = np.zeros((21, 21), np.int64)
    for split, ids in splits.items():
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            pred, gt = random_pair(rng, (12, 9), 21)
            safe_io.write_mask(str(voc / "SegmentationClass" / f"{image_id}.png"), gt)
            if split == "val":  # predictions of val only
                safe_io.write_mask(str(tmp_path / "masks" / f"{image_id}.png"), pred)
                cm += ev.confusion_matrix(pred, gt, 21)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "pmm_jax.evaluate", "--pred_dir=masks/",
           "--gt_dir=VOC2012/SegmentationClass", "--ids=VOC2012/ImageSets/Segmentation/val.txt",
           "--num_classes=21", "--class_names=voc"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 images" in result.stdout
    assert f"**{100 * ev.iou_from_confusion(cm, 'mmseg')[1]:.2f}**" in result.stdout

    gt_dir, pred_dir = str(voc / "SegmentationClass"), str(tmp_path / "masks")
    with pytest.raises(ValueError, match="no prediction for 2 ground-truth ids: 2007_000001"):
        ev.evaluate_dirs(pred_dir, gt_dir, 21)  # without a list: train has no predictions
    with pytest.raises(ValueError, match="no ground truth for 1 listed ids: 2008_000009"):
        ev.evaluate_dirs(pred_dir, gt_dir, 21, ids=["2007_000003", "2008_000009"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: the id list is empty"):
        ev.read_ids(str(tmp_path / "empty.txt"))
    assert ev.read_ids(str(lists / "val.txt")) == splits["val"]
