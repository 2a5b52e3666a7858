"""Best-val checkpoint (config.seg.eval_every): trainer.train's eval_fn, checkpoints.save_model,
and the seg stage's keep_best / load_segmenter choice."""

import ml_collections
import pytest
from flax import nnx

import configs
from pmm_jax import config_rules
from pmm_jax.data.dataset import open_dataset
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import best_checkpoint, inference, segmenter
from pmm_jax.training import checkpoints
from tests.support.tiny_training import TinyNet, assert_trees_close, params_of, run


def test_eval_fn_runs_every_n_steps_and_after_the_last(tmp_path):
    seen = []
    run(tmp_path, 5, eval_fn=lambda step, model: seen.append((step, params_of(model))),
        eval_every=2)
    assert [step for step, _ in seen] == [2, 4, 5]
    final = checkpoints.restore_model(TinyNet(nnx.Rngs(1)), str(tmp_path / "ckpt"), step=5,
                                      hint="")
    assert_trees_close(seen[-1][1], params_of(final))


def test_keep_best_saves_the_best_model_and_load_segmenter_prefers_it(tmp_path, monkeypatch):
    scores = iter([0.3, 0.5, 0.4])
    monkeypatch.setattr(best_checkpoint, "val_miou", lambda config, data, model: next(scores))
    monkeypatch.setattr(segmenter, "build_model",
                        lambda config, seed=0, num_classes=None: TinyNet(nnx.Rngs(7)))
    wd = Workdir(str(tmp_path))
    config = ml_collections.ConfigDict(dict(seg=dict(eval_every=2)))
    models_seen = []
    keep = best_checkpoint.keep_best(config, wd, None, "pus")  # val_miou (stubbed) reads no data
    run(tmp_path, 6, eval_fn=lambda step, model: (models_seen.append(params_of(model)),
                                                  keep(step, model)), eval_every=2)
    assert safe_io.read_json(str(tmp_path / "seg/pus/best/best.json")) == {"step": 4, "miou": 0.5}
    # load_segmenter reads seg/<run>/best when eval_every is on (the last checkpoint otherwise).
    loaded = best_checkpoint.load_segmenter(config, wd, "pus", num_classes=6)
    assert_trees_close(params_of(loaded), models_seen[1])


def perfect_predictor(seen):
    """A stand-in for ``inference.predictor``: records the ids of the valid rows of
    each batch and predicts their ground truth."""
    def predict(batch):
        seen.extend(batch["id"][i].decode() for i in range(len(batch["id"])) if batch["valid"][i])
        return batch["mask"]
    return lambda model, config, source: predict


def test_val_subset_validates_on_the_first_val_images(tmp_path, monkeypatch):
    """``config.seg.val_subset`` = N > 0: the periodic validation reads the first N val images
    (in dataset order), 0 reads all of val; either way their mIoU is scored."""
    config = configs.get_config("demo", "tiny")
    data = open_dataset(config, Workdir(str(tmp_path)))
    seen = []
    monkeypatch.setattr(inference, "predictor", perfect_predictor(seen))
    assert best_checkpoint.val_miou(config, data, model=None) == pytest.approx(1.0)
    every = list(seen)
    assert len(every) == len(set(every)) > 5
    config.seg.val_subset = 5
    seen.clear()
    assert best_checkpoint.val_miou(config, data, model=None) == pytest.approx(1.0)
    assert seen == every[:5]


def test_val_subset_smaller_than_the_process_count_is_refused_by_key():
    """Checked at start-up once the processes are known (``config_rules.check_devices``)."""
    config = configs.get_config("demo", "tiny")
    config.seg.val_subset, config.seg.eval_every = 2, 4
    with pytest.raises(ValueError, match=r"config\.seg\.val_subset=2: each of the 4 processes"):
        config_rules.check_devices(config, processes=4, local_devices=1)
    config.seg.val_subset = 4
    config_rules.check_devices(config, processes=4, local_devices=1)
