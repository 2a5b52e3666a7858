"""The seg stage's starting point: ``config.seg.model.init_from_cls`` copies the cls stage's
trained classifier backbone (parameters and BN statistics) into the segmenter."""

import numpy as np
import pytest
from flax import nnx

import configs
from pmm_jax.cams import classifier
from pmm_jax.files.workdir import Workdir
from pmm_jax.models.pretrained import flat_weights
from pmm_jax.segmentation import segmenter
from pmm_jax.stages import seg
from pmm_jax.training import checkpoints

NUM_CLASSES = 6  # the tiny synthetic dataset's, background included


def save_trained_classifier(config, wd: Workdir) -> nnx.Module:
    """A stand-in for stage cls's checkpoint: a classifier whose backbone weights and BN
    statistics differ from any fresh initialisation (seed 5, then shifted)."""
    trained = classifier.build_model(config, seed=5)
    for i, var in enumerate(flat_weights(trained.backbone).values()):
        var.set_value(var.get_value() + 0.01 * (i + 1))
    checkpoints.save_model(trained, wd.ckpt_dir("cls"), step=12)
    return trained


def backbone_arrays(module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in flat_weights(module.backbone).items()}


def test_init_from_cls_starts_the_segmenter_backbone_from_the_cls_checkpoint(tmp_path):
    config = configs.get_config("demo", "tiny")  # init_from_cls on
    assert config.seg.model.init_from_cls
    wd = Workdir(str(tmp_path))
    expected = backbone_arrays(save_trained_classifier(config, wd))
    model = segmenter.initial_model(config, wd, NUM_CLASSES)
    got = backbone_arrays(model)
    assert set(got) == set(expected) and "stem.bn.mean" in got
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The heads keep the seeded initialisation of a segmenter built without the copy.
    fresh = segmenter.build_model(config, config.seed)
    np.testing.assert_array_equal(np.asarray(model.decode_head.classifier.kernel.get_value()),
                                  np.asarray(fresh.decode_head.classifier.kernel.get_value()))
    with config.unlocked():
        config.seg.model.init_from_cls = False
    assert not np.array_equal(backbone_arrays(segmenter.initial_model(config, wd, NUM_CLASSES))["stem.conv.kernel"],
                              expected["stem.conv.kernel"])


def test_init_from_cls_refuses_a_different_backbone_and_a_missing_checkpoint(tmp_path):
    config = configs.get_config("demo", "tiny")
    wd = Workdir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="made by stage 'cls': include cls in"):
        segmenter.initial_model(config, wd, NUM_CLASSES)
    save_trained_classifier(config, wd)
    with config.unlocked():
        config.seg.model.backbone = dict(config.seg.model.backbone.to_dict(),
                                         widths=(8, 16, 16, 64))
    with pytest.raises(ValueError, match=r"config\.seg\.model\.backbone(.|\n)*shape mismatch"):
        segmenter.initial_model(config, wd, NUM_CLASSES)
    with config.unlocked():
        config.seg.model.backbone = config.cls.model.backbone
        config.seg.model.init_from = "/some/imagenet/ckpt"
    with pytest.raises(ValueError, match="init_from and config.seg.model.init_from_cls"):
        segmenter.initial_model(config, wd, NUM_CLASSES)


def test_a_resumed_segmenter_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    """Killed after step 6 (checkpoint 4 kept) and resumed: every array of the final
    checkpoint (model and optimizer) equals an uninterrupted run's; the masks come from a
    folder, read lazily after the stream skips the consumed batches."""
    import tensorflow_datasets as tfds
    from tests.support.interrupted_runs import (Interrupted, assert_identical_checkpoints, interrupt_after,
                                short_config)

    from pmm_jax.data import dataset, pipeline
    from pmm_jax.files import safe_io

    config = short_config("seg")
    with config.unlocked():
        config.seg.model.init_from_cls = False
        config.data.data_dir = str(tmp_path / "tfds")
    whole, killed = Workdir(str(tmp_path / "whole")), Workdir(str(tmp_path / "killed"))
    data = dataset.open_dataset(config, whole)
    masks = tmp_path / "masks"
    masks.mkdir()
    for ex in tfds.as_numpy(pipeline.load_split(data.name, "train", data.data_dir)):
        safe_io.write_mask(str(masks / f"{ex['id'].decode()}.png"), ex["mask"][:, :, 0])
    seg.train_segmenter(config, whole, data, "ce", str(masks), "ce")
    with monkeypatch.context() as patch:
        interrupt_after(patch, dataset.Dataset, "train_batches", 6)
        with pytest.raises(Interrupted):
            seg.train_segmenter(config, killed, data, "ce", str(masks), "ce")
    seg.train_segmenter(config, killed, data, "ce", str(masks), "ce")
    assert_identical_checkpoints(killed.ckpt_dir("seg/ce"), whole.ckpt_dir("seg/ce"), 8)
