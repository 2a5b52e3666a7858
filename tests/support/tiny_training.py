"""A tiny network trained by the real trainer, for the trainer, checkpoint and best-checkpoint
tests: its batches, loss, a run of ``trainer.train`` and tree comparisons."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pmm_jax.training import optimizers
from pmm_jax.training import checkpoints, trainer


NUM_CLASSES = 3


class TinyNet(nnx.Module):
    """Conv + BatchNorm + Dropout + Dense: every kind of state the real models carry.

    ``dropout`` draws from the ``rngs`` the trainer passes at call time; ``channel_dropout``
    owns its RNG stream (a PRNG key and counter in the state, like the real models' Dropout2d).
    """

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.channel_dropout = nnx.Dropout(0.25, broadcast_dims=(1, 2), rngs=rngs)
        self.dropout = nnx.Dropout(0.25)
        self.head = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

    def __call__(self, x, rngs=None):
        h = self.channel_dropout(nnx.relu(self.bn(self.conv(x))))
        return self.head(self.dropout(h.mean(axis=(1, 2)), rngs=rngs))


def make_batch(step: int, size: int = 8) -> dict:
    """A deterministic batch for ``step``: the class is which colour channel is brightest."""
    rng = np.random.default_rng(step)
    label = rng.integers(0, NUM_CLASSES, size)
    image = rng.normal(size=(size, 6, 6, 3)).astype(np.float32)
    image[np.arange(size), :, :, label] += 1.5
    return {"image": image, "label": label.astype(np.int32),
            "id": np.array([f"{step}_{i}".encode() for i in range(size)])}


def batches_from(step: int):
    return (make_batch(s) for s in itertools.count(step))


def loss_fn(model, batch, rngs):
    logits = model(batch["image"], rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def run(tmp_path, num_steps, *, model=None, batches=None, loss=loss_fn, **kwargs):
    """Trains TinyNet with the poly schedule of a 10-step run, logging every 2 steps."""
    tx, schedule = optimizers.sgd_poly(0.3, 10)
    kwargs = dict(log_every=2, ckpt_every=3) | kwargs
    return trainer.train(model or TinyNet(nnx.Rngs(0)), loss, batches or batches_from(
        checkpoints.latest_step(str(tmp_path / "ckpt")) or 0), tx, num_steps=num_steps,
        ckpt_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "tb"), seed=0,
        lr_schedule=schedule, **kwargs)


def params_of(model):
    """The whole model state as numpy (parameters, BatchNorm statistics, RNG keys and counts)."""
    as_data = lambda x: (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                         else x)
    return jax.device_get(jax.tree_util.tree_map(as_data, nnx.to_pure_dict(nnx.state(model))))


def assert_trees_close(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                           a, b)
