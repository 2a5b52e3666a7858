"""Unit tests of pmm_jax.notebook_utils on a hand-made workdir (no pipeline run)."""

import os

import numpy as np
import pytest

import configs
from pmm_jax import notebook_utils as nu
from pmm_jax.constants import PALETTE
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """config.json, the tiny dataset, CAMs and masks of two train images, results, TB logs."""
    from clu import metric_writers

    root = str(tmp_path_factory.mktemp("workdir"))
    wd = Workdir(root)
    config = configs.get_config("demo", "tiny")
    safe_io.write_json(wd.config_json, config.to_dict())
    config = nu.load_config(root)
    rng = np.random.default_rng(0)
    for ex in nu.examples(config, root, "train", limit=2):
        present = np.flatnonzero(ex["labels"] > 0.5)
        safe_io.write_cams(os.path.join(wd.cams("train"), f"{ex['id']}.npy"),
                      {int(c): rng.random(ex["mask"].shape).astype(np.float32) for c in present})
        for variant in ("baseline", "ppmg"):
            safe_io.write_mask(os.path.join(wd.pseudo_masks(variant), f"{ex['id']}.png"),
                          np.where(ex["mask"] == 255, 0, ex["mask"]))
    safe_io.write_json(wd.results_json, {"cam_miou": 0.4, "cam_bg_threshold": 0.15,
                                     "pseudo_mask_miou": {"ppmg": 0.5}, "seg_miou": {"pus": 0.6}})
    writer = metric_writers.SummaryWriter(wd.log_dir("cls"))
    for step, loss in ((2, 1.0), (4, 0.5), (4, 0.25)):  # step 4 again: a resumed run
        writer.write_scalars(step, {"loss": loss, "learning_rate": 0.1})
    writer.close()
    images = metric_writers.SummaryWriter(wd.log_dir("cam"))
    images.write_images(0, {"cam/x": np.zeros((1, 4, 4, 3), np.uint8)})
    images.close()
    assert nu.dataset(config, root).data_dir == os.path.join(root, "tfds")
    return root


def test_load_config_reads_config_json_and_names_a_wrong_dir(workdir, tmp_path):
    assert nu.load_config(workdir).data.name == "synthetic_wsss/tiny"
    with pytest.raises(FileNotFoundError, match="workdir of a pmm_jax run"):
        nu.load_config(str(tmp_path))


def test_examples_by_limit_and_by_id(workdir):
    config = nu.load_config(workdir)
    first = nu.examples(config, workdir, "train", limit=3)
    assert len(first) == 3 and first[0]["image"].dtype == np.uint8
    chosen = nu.examples(config, workdir, "train", ids=[first[2]["id"]])
    assert [ex["id"] for ex in chosen] == [first[2]["id"]]
    assert np.array_equal(chosen[0]["mask"], first[2]["mask"])


def test_image_views_collect_masks_that_exist(workdir):
    config = nu.load_config(workdir)
    first, third = nu.examples(config, workdir, "train", limit=3)[::2]
    views = nu.image_views(config, workdir, first, "train",
                           predictions={"pus": np.ones(first["mask"].shape, np.uint8)})
    assert list(views["masks"]) == ["pseudo/baseline", "pseudo/ppmg", "prediction/pus",
                                    "ground truth"]
    assert (views["masks"]["prediction/pus"] == PALETTE[1]).all()
    assert views["cams"] and views["cvs"]
    bare = nu.image_views(config, workdir, third, "train")  # no CAM or mask files
    assert bare["cams"] == {} and list(bare["masks"]) == ["ground truth"]
    assert nu.predicted_runs(workdir, "train") == [] and nu.trained_segmenters(workdir) == []


def test_results_rows_and_markdown(workdir, tmp_path):
    rows = nu.results_rows(workdir)
    assert rows[0] == {"result": "CAM (bg threshold 0.15)", "miou_percent": 40.0}
    assert [r["result"] for r in rows[1:]] == ["pseudo-mask ppmg (train subset)",
                                               "segmenter pus (val)"]
    table = nu.markdown_table(rows).splitlines()
    assert table[0] == "| result | miou_percent |" and table[2].endswith("| 40.00 |")
    assert nu.results_rows(str(tmp_path)) == [] and nu.markdown_table([]) == ""


def test_training_curves_read_scalars_and_skip_image_only_logs(workdir):
    assert set(nu.log_dirs(workdir)) == {"cls", "cam"}
    curves = nu.training_curves(workdir)
    assert list(curves) == ["cls"]
    steps, values = curves["cls"]["loss"]
    assert steps.tolist() == [2, 4] and values.tolist() == [1.0, 0.25]
    assert curves["cls"]["learning_rate"][1] == pytest.approx([0.1, 0.1])
