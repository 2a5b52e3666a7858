"""Interrupting a stage's training mid-run and comparing its checkpoints with an uninterrupted
run's, for the resume tests of the cls and seg stages and of the whole pipeline."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp

import configs


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
