"""The shared training loop: learning, shardings, donation, resume, logging, predict, sgd_poly
(checkpoint integrity and restores: ``tests/training/test_checkpoints.py``)."""

import itertools
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax.training import checkpoints, optimizers, trainer
from tests.support.tiny_training import (NUM_CLASSES, TinyNet, assert_trees_close, batches_from,
                                          loss_fn, make_batch, params_of, run)


class Uninterrupted(NamedTuple):
    final: dict
    path: pathlib.Path
    model: nnx.Module
    initial_kernel: jax.Array
    batch_shardings: list


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 10-step run in one go (with image summaries) that most tests inspect."""
    path = tmp_path_factory.mktemp("full")
    model = TinyNet(nnx.Rngs(0))
    replicated = trainer.shd.replicated(trainer.shd.make_mesh())
    nnx.update(model, jax.device_put(nnx.state(model), replicated))
    initial_kernel = model.conv.kernel[...]
    batch_shardings = []

    def inspecting_loss(model, batch, rngs):
        jax.debug.inspect_array_sharding(batch["image"], callback=batch_shardings.append)
        return loss_fn(model, batch, rngs)

    def summary(model, batch):
        return {"inputs": (np.clip(batch["image"][:2], 0, 1) * 255).astype(np.uint8)}

    run(path, 10, model=model, loss=inspecting_loss, image_summary_fn=summary)
    return Uninterrupted(params_of(model), path, model, initial_kernel, batch_shardings)


def test_state_replicated_batch_sharded_and_donated(uninterrupted):
    assert uninterrupted.initial_kernel.is_deleted(), "the state must be donated to the step"
    (spec,) = uninterrupted.batch_shardings
    assert spec.spec[0] == "data" and len(spec.device_set) == 4
    for leaf in jax.tree_util.tree_leaves(nnx.state(uninterrupted.model)):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
    model = uninterrupted.model
    assert model.dropout.deterministic and model.bn.use_running_average, "returned in eval mode"


def test_logged_scalars_images_and_loss_decrease(uninterrupted):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(
        str(uninterrupted.path / "tb"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert {"loss", "accuracy", "learning_rate", "steps_per_sec", "inputs"} <= set(
        events.Tags()["tensors"])
    value = lambda tag: [float(tensor_util.make_ndarray(e.tensor_proto))
                         for e in events.Tensors(tag)]
    assert [e.step for e in events.Tensors("loss")] == [2, 4, 6, 8, 10]
    loss = value("loss")
    assert loss[-1] < 0.7 * loss[0], loss
    np.testing.assert_allclose(value("learning_rate")[:2],
                               [0.3 * (1 - 1 / 10) ** 0.9, 0.3 * (1 - 3 / 10) ** 0.9], rtol=1e-5)


def killed_after(num_batches: int):
    """Batches for steps 0.. that stop the run like a kill when batch ``num_batches`` is asked."""
    yield from (make_batch(s) for s in range(num_batches))
    raise KeyboardInterrupt


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, uninterrupted):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 10, batches=killed_after(7))  # steps 1..7 done, checkpoints at 3 and 6
    assert checkpoints.latest_step(str(tmp_path / "ckpt")) == 6
    consumed = []
    batches = (consumed.append(s) or make_batch(s) for s in itertools.count(6))
    resumed = params_of(run(tmp_path, 10, batches=batches))
    assert consumed[0] == 6 and len(consumed) == 4, "must resume at step 6, not restart"
    assert checkpoints.latest_step(str(tmp_path / "ckpt")) == 10
    assert_trees_close(resumed, uninterrupted.final)


def test_completed_run_is_skipped(uninterrupted):
    final, path = uninterrupted.final, uninterrupted.path

    def never_called(*args):
        raise AssertionError("a completed run must not trace the step")

    model = run(path, 10, batches=iter(()), loss=never_called)
    assert_trees_close(params_of(model), final)


def test_tensorboard_events_and_checkpoints_kept(uninterrupted):
    path = uninterrupted.path
    assert list((path / "tb").glob("events.out.tfevents*"))
    assert sorted(int(p.name) for p in (path / "ckpt").iterdir() if p.name.isdigit()) == [9, 10]


def test_predict_returns_local_rows_in_order(uninterrupted):
    model = uninterrupted.model
    predict = trainer.make_predict_fn(model, lambda m, b: {"logits": m(b["image"])})
    batch = make_batch(7, 8)
    out = predict(batch)
    assert isinstance(out["logits"], np.ndarray) and out["logits"].shape == (8, NUM_CLASSES)
    expected = nnx.jit(lambda m, x: m(x))(model, batch["image"])
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="config.eval.batch_size"):
        trainer.make_predict_fn(model, lambda m, b: m(b["image"]),
                                batch_size_key="config.eval.batch_size")(make_batch(0, 6))


def poisoned_batches(bad_step: int):
    """Batches for steps 1.. where step ``bad_step``'s batch carries a ``poison`` flag."""
    for s in itertools.count(0):
        yield make_batch(s) | {"poison": np.full(8, float(s + 1 == bad_step), np.float32)}


def nan_loss(model, batch, rngs):
    """``loss_fn``, made NaN (loss and gradient) by a poisoned batch."""
    loss, metrics = loss_fn(model, batch, rngs)
    return loss + jnp.where(batch["poison"].max() > 0, jnp.nan, 0.0), metrics


def nan_gradient(model, batch, rngs):
    """``loss_fn`` plus ``|v| - |v|`` (no change in value), where ``v`` is ``0 * kernel`` on a
    poisoned batch (``|v|`` has a NaN gradient at 0) and a constant elsewhere: a finite loss
    with a non-finite gradient norm at that step only."""
    loss, metrics = loss_fn(model, batch, rngs)
    poison = batch["poison"].max()
    v = model.head.kernel[...] * 0.0 + (1.0 - poison)
    norm = jnp.linalg.norm(v)
    return loss + norm - jax.lax.stop_gradient(norm), metrics


@pytest.mark.parametrize("loss, text", [(nan_loss, "loss=nan"), (nan_gradient, "grad_norm=nan")])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, loss, text):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(trainer.DivergenceError) as err:
        run(tmp_path, 10, batches=poisoned_batches(5), loss=loss, log_every=4, ckpt_every=2,
            desc="seg pus")
    message = str(err.value)
    # Found at step 6 (a checkpoint step), before anything from step 5 on was saved.
    assert "seg pus: training diverged at step 5" in message and text in message
    assert "accuracy=" in message and "grad_norm=" in message
    assert f"last good checkpoint is step 4 in {tmp_path / 'ckpt'}" in message
    assert checkpoints.latest_step(ckpt) == 4
    # The kept checkpoint is the state after step 4 of a run that never saw the poison.
    good = tmp_path / "good"
    expected = params_of(run(good, 4, batches=batches_from(0), ckpt_every=2))
    restored = checkpoints.restore_model(TinyNet(nnx.Rngs(1)), ckpt, step=4, hint="")
    assert_trees_close(params_of(restored), expected)


def test_sgd_poly_schedule_and_decay_mask():
    tx, schedule = optimizers.sgd_poly(0.2, 100, power=0.9, end_lr=0.01)
    np.testing.assert_allclose(schedule(0), 0.2)
    np.testing.assert_allclose(schedule(50), 0.19 * 0.5 ** 0.9 + 0.01, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 0.01)
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.2 * 5e-4 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], 0.0)
    tx, _ = optimizers.sgd_poly(0.2, 100, decay_1d=True)  # mmseg's: every parameter decayed
    updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["bias"], -0.2 * 5e-4 * np.ones(2), rtol=1e-6)

