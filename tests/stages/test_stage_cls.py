"""Stage cls: a run interrupted after a checkpoint and resumed ends bit-identical to an
uninterrupted one (``pipeline.stream`` replays the seeded data stream and skips the consumed
batches; the trainer restores model and optimizer)."""

from __future__ import annotations

import pytest

from pmm_jax.data import dataset
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import cls
from tests.support.interrupted_runs import (Interrupted, assert_identical_checkpoints,
                                            interrupt_after, short_config)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_a_resumed_classifier_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                        data_dir):
    config = short_config("cls")
    with config.unlocked():
        config.data.data_dir = data_dir
    whole, killed = Workdir(str(tmp_path / "whole")), Workdir(str(tmp_path / "killed"))
    data = dataset.open_dataset(config, whole)
    cls.run(config, whole, data)
    with monkeypatch.context() as patch:
        # Killed after step 6; checkpoint 4 kept.
        interrupt_after(patch, dataset.Dataset, "train_batches", 6)
        with pytest.raises(Interrupted):
            cls.run(config, killed, data)
    cls.run(config, killed, data)  # resumes at step 4
    assert_identical_checkpoints(killed.ckpt_dir("cls"), whole.ckpt_dir("cls"), 8)
