"""Stage ``eval``'s results: what results.json gathers and how the table prints it."""

from __future__ import annotations

import ml_collections

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import eval as eval_stage
from pmm_jax.tools import results_table


def config(num_cycles: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        eval=dict(rule="mmseg"),
        seg=dict(runs=("ce", "pus")), cycle=dict(num_cycles=num_cycles)))


def test_results_carry_the_pseudo_mask_split_and_the_cyclic_key(tmp_path):
    wd = Workdir(str(tmp_path))
    safe_io.write_json(wd.stage_marker("pseudo"), {"seconds": 3.0, "metrics": {
        "pseudo_mask_miou": {"ppmg": 0.5}, "pseudo_mask_eval": {"split": "train", "num_images": 1464}}})
    res = eval_stage.results(config(1), wd, {"ce": 0.1, "pus": 0.2, "cycle1": 0.3}, 1.0,
                             dataset="voc2012_wsss")
    assert res["dataset"] == "voc2012_wsss"
    assert res["pseudo_mask_eval"] == {"split": "train", "num_images": 1464}
    assert res["seg_miou"] == {"ce": 0.1, "pus": 0.2, "cycle1": 0.3, "cyclic": 0.3}


def test_table_prints_the_last_cycle_once_and_where_masks_were_scored():
    table = results_table.format_table({
        "pseudo_mask_miou": {"ppmg": 0.5}, "pseudo_mask_eval": {"split": "train", "num_images": 1464},
        "seg_miou": {"ce": 0.1, "cycle1": 0.25, "cycle2": 0.3, "cyclic": 0.3}, "seconds": {}})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "%" not in line]
    assert "| pseudo-mask ppmg (train, 1464 images) | 50.00 |" in rows
    assert "| segmenter cycle1 (val) | 25.00 |" in rows
    assert "| segmenter cycle2 (cyclic) (val) | 30.00 |" in rows
    assert sum("30.00" in row for row in rows) == 1 and not any("segmenter cyclic" in r for r in rows)


def test_table_of_a_run_without_cycles_lists_every_segmenter():
    table = results_table.format_table({"seg_miou": {"ce": 0.1, "pus": 0.2}})
    assert "| segmenter ce (val) | 10.00 |" in table and "| segmenter pus (val) | 20.00 |" in table


def test_table_prints_n_a_for_mious_not_available():
    """A folder dataset without masks has no val: its mIoUs are None (null), printed n/a."""
    table = results_table.format_table({
        "cam_miou": None, "cam_bg_threshold": 0.1, "pseudo_mask_miou": {"ppmg": None},
        "seg_miou": {"pus": None, "cycle1": None, "cyclic": None}})
    assert "| CAM (bg threshold 0.1) | n/a |" in table
    assert "| pseudo-mask ppmg (train subset) | n/a |" in table
    assert "| segmenter cycle1 (cyclic) (val) | n/a |" in table
    assert "0.00" not in table
