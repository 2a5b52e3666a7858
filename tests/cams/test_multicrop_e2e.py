"""PMM's multi-crop recipe end to end on the tiny synthetic dataset, in process: rough masks
from a stand-in first run's CAMs (``generator.generate``, method ``rough``), then a tiny ScaleNet-layout SEAM
classifier trained on multi-crop tiles (stage ``cls``), multi-crop CAM inference (``cam``)
and pseudo-masks made from those CAM files (``pseudo``)."""

import os

import ml_collections
import numpy as np
import scipy.ndimage
from flax import nnx

import configs
from pmm_jax import main
from pmm_jax.cams import classifier
from pmm_jax.data import multicrop_batches
from pmm_jax.data.dataset import open_dataset
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.masks import generator
from pmm_jax.stages import cls
from tests.support.nnx_values import materialize

# 48-pixel images: at 0.5 smaller than a 32-pixel tile (one tile), 2 x 2 tiles at 1.0 and
# 3 x 3 at 1.5.
TRAIN_SCALES, CAM_SCALES = (0.5, 1.0, 1.5), (0.5, 1.0)


def tiny_multicrop_config(data_dir: str, rough_mask_dir: str) -> ml_collections.ConfigDict:
    """configs/demo.py:tiny with a 1/16-width, one-block-per-layer ScaleNet SEAM classifier
    (two branches per block, scales 1 and 2) trained on 32-pixel multi-crop tiles and
    multi-crop CAMs; PPMG pseudo-masks only."""
    c = configs.get_config("demo", "tiny")
    c.stages = "cls,cam,pseudo"
    c.data.data_dir = data_dir
    c.cls.method = "seam"
    c.cls.model = ml_collections.ConfigDict(dict(
        backbone=dict(name="scalenet101", layers=(1, 1, 1, 1), width_div=16,
                      structure=[[4, 2, 0, 0, 56], [6, 2, 0, 0, 28], [8, 2, 0, 0, 14],
                                 [10, 2, 0, 0, 7]]),
        dropout=0.0, pcm_widths=(4, 8)))
    c.cls.update(dict(batch_size=8, crop_size=32, num_steps=2, log_every=2, ckpt_every=2))
    c.cls.multicrop.update(dict(rough_masks=rough_mask_dir, scales=TRAIN_SCALES, crop=32,
                                stride=21))
    c.cam.method = "multicrop"
    c.cam.multicrop.update(dict(scales=CAM_SCALES, crop=32, stride=21, tile_batch=32))
    c.pseudo.update(dict(variants=("ppmg",), eval_subset=8, num_workers=1))
    return c


def first_run_cams(config, wd: Workdir) -> list[dict]:
    """Stand-in for a first model's CAM files: each present class's ground truth, blurred and
    max-normalised; returns the train split's examples."""
    records = []
    for ex in open_dataset(config, wd).examples("train", all_processes=True):
        cams = {}
        for c in np.flatnonzero(ex["labels"] > 0.5):
            blurred = scipy.ndimage.gaussian_filter((ex["mask"] == c + 1).astype(np.float32), 2)
            cams[int(c)] = blurred / max(blurred.max(), 1e-6)
        safe_io.write_cams(os.path.join(wd.cams("train"), f"{ex['id']}.npy"), cams)
        records.append(ex)
    return records


def test_tiny_multicrop_recipe(tmp_path, monkeypatch):
    data_dir, rough_dir = str(tmp_path / "tfds"), str(tmp_path / "rough")
    config = tiny_multicrop_config(data_dir, rough_dir)
    first = Workdir(str(tmp_path / "first"))
    records = first_run_cams(config, first)
    rough = generator.default_config("rough")
    rough.num_classes = config.data.num_classes
    stats = generator.generate(generator.dataset_records(records, first.cams("train")), rough_dir,
                               rough, num_workers=1, process_index=0, process_count=1)
    assert stats["written"] == len(records)

    # The configured model, built shape-only and filled from numpy (eager initialisation
    # compiles one program per parameter shape: ~10 s of this test's budget).
    build_model = classifier.build_model
    fast_build = lambda config, seed=0, **kw: materialize(
        nnx.eval_shape(lambda: build_model(config, seed, **kw)))
    monkeypatch.setattr(classifier, "build_model", fast_build)
    # No TensorBoard CAM pictures (an eager, op-by-op forward: ~10 s here).
    monkeypatch.setattr(cls, "cam_summary", lambda model, batch: {})
    calls = []
    tiles = multicrop_batches.multicrop_train_batches
    monkeypatch.setattr(multicrop_batches, "multicrop_train_batches",
                        lambda ds, **kw: calls.append(kw) or tiles(ds, **kw))
    wd = Workdir(str(tmp_path / "run"))
    main.run(config, wd.root)
    assert [kw["rough_masks"] for kw in calls] == [rough_dir]  # cls trained on tiles

    for stage in ("cls", "cam", "pseudo"):
        assert os.path.exists(wd.stage_marker(stage))
    for split in ("train", "val"):
        examples = list(open_dataset(config, wd).examples(split, all_processes=True))
        assert sorted(os.listdir(wd.cams(split))) == sorted(f"{e['id']}.npy" for e in examples)
        for ex in examples:
            cams = safe_io.read_cams(os.path.join(wd.cams(split), f"{ex['id']}.npy"))
            assert sorted(cams) == np.flatnonzero(ex["labels"] > 0.5).tolist()
            for values in cams.values():
                assert values.shape == ex["image"].shape[:2]
                assert 0 <= values.min() <= values.max() <= 1
            if split == "train":
                mask = safe_io.read_mask(os.path.join(wd.pseudo_masks("ppmg"), f"{ex['id']}.png"))
                assert mask.shape == ex["image"].shape[:2]
                assert set(np.unique(mask)) <= {0} | {c + 1 for c in cams}
