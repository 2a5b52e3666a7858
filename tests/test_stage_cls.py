"""Stage cls: a run interrupted after a checkpoint and resumed ends bit-identical to an
uninterrupted one (``pipeline.stream`` replays the seeded data stream and skips the consumed
batches; the trainer restores model and optimizer)."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs
from pmm_jax.data import dataset
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import cls


class Interrupted(Exception):
    """Stands in for a kill: raised by the data iterator mid-run."""


def interrupt_after(monkeypatch, module, name: str, batches: int) -> None:
    """Makes ``module.name`` (a batch-iterator factory) raise :class:`Interrupted` on batch
    ``batches + 1``, as a run killed after step ``batches`` (its checkpoints saved)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        inner = original(*args, **kwargs)
        for _ in range(batches):
            yield next(inner)
        raise Interrupted

    monkeypatch.setattr(module, name, wrapped)


def checkpoint_arrays(ckpt_dir: str, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint step (items ``model`` and ``opt``), by flattened path."""
    with ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
            read_only=True)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore()))
    flat = {}
    for item in ("model", "opt"):
        for path, leaf in ocp.tree.to_flat_dict(dict(restored[item]), sep="/").items():
            flat[f"{item}/{path}"] = np.asarray(leaf)
    return flat


def assert_identical_checkpoints(got_dir: str, expected_dir: str, step: int) -> None:
    got, expected = checkpoint_arrays(got_dir, step), checkpoint_arrays(expected_dir, step)
    assert set(got) == set(expected) and len(got) > 10
    differing = [k for k in expected if not np.array_equal(got[k], expected[k])]
    assert not differing, f"{len(differing)} of {len(expected)} arrays differ: {differing[:5]}"


def short_config(section: str):
    """configs/demo.py:tiny with ``section`` trained for 8 steps, checkpoints every 4."""
    config = configs.get_config("demo", "tiny")
    with config.unlocked():
        config[section].num_steps, config[section].ckpt_every, config[section].log_every = 8, 4, 4
        config.data.data_dir = ""
    return config


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
