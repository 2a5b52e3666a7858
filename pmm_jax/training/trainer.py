"""The one training loop (classifier and segmenter) and the sharded predict helper.

Functional NNX: the model and its optimizer are split into a static graphdef and one state
pytree ONCE; a single jitted step merges them, computes loss and gradients, applies the update
and returns the new state. The state is replicated over the ``"data"`` mesh axis and donated to
the step (its buffers are reused, the previous step's arrays are deleted); batches are sharded
over ``"data"``. BatchNorm statistics and any RNG counters are part of the state, so they are
carried, donated and checkpointed like the parameters.

Randomness: the step calls ``loss_fn(model, batch, rngs)`` with ``rngs = nnx.Rngs(dropout=
jax.random.fold_in(jax.random.key(seed), step))`` where ``step`` is the optimizer's step counter
(0-based index of the update being computed). A model may pass it on to ``nnx.Dropout(...)(x,
rngs=rngs)``; each Dropout draws a fresh key from the stream, so several dropout layers get
independent masks, and a resumed run sees exactly the keys an uninterrupted run would. A Dropout
built with its own stream (``nnx.Dropout(rate, rngs=rngs)``) may ignore the argument instead:
its key and counter live in the state and are checkpointed, so resuming is exact either way.

Resuming: ``train`` restores the newest intact checkpoint (``pmm_jax.training.checkpoints``:
saving, digests, damaged steps set aside) and continues from its step; a run that is already
complete returns the restored model without compiling anything. The data iterator is the
caller's: a resumed run must hand ``train`` an iterator whose first batch is the one for step
``checkpoints.latest_step(ckpt_dir)`` (0 when ``None``), exactly the batch an uninterrupted run
would use there (``pmm_jax.data.pipeline.stream`` skips the consumed ones). Every process runs
the same loop and saves; orbax coordinates the processes and writes the replicated arrays once.

Metrics stay on device (summed by a tiny jitted add) and are fetched to the host only on log
steps, so the host never waits on the accelerator in between.

Divergence: the step also returns the global gradient norm (``grad_norm``). Every step a tiny
jitted function records on device the first step whose loss or gradient norm is not finite, and
that step's metrics; the host reads that record only where it would act on the state: before
logging, saving a checkpoint or evaluating. A diverged run therefore raises
:class:`DivergenceError` at the next such step (at most ``min(log_every, ckpt_every)`` wasted
steps) without ever saving a state computed after the bad step, so the newest checkpoint is the
last good one and a resumed run starts from it. A per-step host check would instead make the
host wait for every step before dispatching the next, losing the asynchronous dispatch that
keeps the accelerator busy.
"""

import logging
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from pmm_jax.training import checkpoints
from pmm_jax.training import sharding as shd
from pmm_jax.training.sharded_apply import ReplicatedModel

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm; nothing after it was saved."""


LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], nnx.Rngs],
                  tuple[jax.Array, Mapping[str, jax.Array]]]


def train(model: nnx.Module, loss_fn: LossFn, batches: Iterator[Mapping[str, np.ndarray]],
          tx: optax.GradientTransformation, *, num_steps: int, ckpt_dir: str,
          log_dir: str | None, seed: int, log_every: int = 50, ckpt_every: int = 200,
          lr_schedule: optax.Schedule | None = None,
          image_summary_fn: Callable[[nnx.Module, Mapping[str, np.ndarray]],
                                     Mapping[str, np.ndarray]] | None = None,
          batch_size_key: str = "batch_size", desc: str = "train",
          eval_fn: Callable[[int, nnx.Module], None] | None = None,
          eval_every: int = 0) -> nnx.Module:
    """Trains ``model`` for ``num_steps`` updates (resuming from ``ckpt_dir``) and returns it.

    ``loss_fn(model, batch, rngs) -> (loss, metrics)`` runs under ``jax.jit`` on the merged
    model in train mode; ``batch`` holds the numeric entries of the host batch as global arrays
    sharded over ``"data"``; ``metrics`` is a dict of scalars. ``batches`` yields this process's
    per-process batches starting at step ``latest_step(ckpt_dir) or 0``. The scalars (mean over
    the last ``log_every`` steps), the learning rate ``lr_schedule(step - 1)`` of the last update
    and ``steps_per_sec`` are written every ``log_every`` steps to ``log_dir`` (TensorBoard; None
    = logging only), with ``image_summary_fn(eval_model, host_batch) -> {name: uint8 [N,H,W,C]}``
    when given. ``batch_size_key`` names the config setting quoted when a batch does not split
    over the devices. ``eval_fn(step, eval_model)``, when given, runs every ``eval_every``
    steps and after the last one on an eval-mode copy of the current model (mmseg's periodic
    validation; the caller keeps the best checkpoint, e.g. with ``save_model``). The model is
    updated in place and returned in eval mode. Raises :class:`DivergenceError` (naming
    ``desc``, the first bad step, its metrics and the last good checkpoint) when the loss or
    the gradient norm stops being finite; no later state is saved (module docstring).
    """
    mesh = shd.make_mesh()
    model.train()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state = shd.replicate(state, mesh)
    with checkpoints.manager(ckpt_dir, save_interval_steps=ckpt_every) as manager:
        start = checkpoints.restore_train_state(manager, state)
        if start:
            log.info("%s: resumed from the checkpoint at step %d of %d in %s", desc, start,
                     num_steps, ckpt_dir)
        if start < num_steps:
            # clu (and through it TensorFlow) only where logging needs it: the benchmarks
            # import this module on machines without TensorFlow.
            from clu import metric_writers

            step_fn = make_step(graphdef, loss_fn, seed, mesh)

            writer = metric_writers.create_default_writer(
                log_dir, just_logging=jax.process_index() > 0)
            try:
                state = _loop(step_fn, state, batches, manager, writer, mesh, graphdef,
                              start=start, num_steps=num_steps, log_every=log_every,
                              lr_schedule=lr_schedule, image_summary_fn=image_summary_fn,
                              batch_size_key=batch_size_key, desc=desc, eval_fn=eval_fn,
                              eval_every=eval_every)
            finally:
                writer.close()
                manager.wait_until_finished()
    nnx.update((model, optimizer), state)
    model.eval()
    return model


def make_predict_fn(model: nnx.Module, fn: Callable[[nnx.Module, Mapping[str, jax.Array]], Any],
                    *, batch_size_key: str = "batch_size"
                    ) -> Callable[[Mapping[str, np.ndarray]], Any]:
    """Returns ``predict(host_batch) -> numpy outputs`` running ``fn(model, batch)`` under jit.

    The model runs in eval mode, replicated; the batch is sharded over ``"data"`` (its per-process
    size must divide by the local device count: the eval pipeline pads and marks padding rows
    with ``valid``). Every output leaf must be per-row, i.e. have the batch as leading axis. Each
    process gets back exactly its own local rows, in the order it passed them in, as numpy.
    """
    replicated = ReplicatedModel(model)
    jitted = jax.jit(lambda state, batch: fn(replicated.eval_model(state), batch),
                     in_shardings=(replicated.replicated, replicated.data),
                     out_shardings=replicated.data)

    def predict(batch: Mapping[str, np.ndarray]) -> Any:
        return replicated.local_rows(jitted(replicated.state,
                                            replicated.shard(batch, batch_size_key)))

    return predict


def make_step(graphdef: nnx.GraphDef, loss_fn: LossFn, seed: int, mesh: jax.sharding.Mesh
               ) -> Callable[[nnx.State, Mapping[str, jax.Array]], tuple[nnx.State, dict]]:
    """The jitted train step ``(state, batch) -> (new_state, metrics)``, state donated;
    ``metrics`` holds ``loss``, the loss function's metrics and the global ``grad_norm``."""
    base_key = jax.random.key(seed)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        key = jax.random.fold_in(base_key, optimizer.step[...])

        def objective(model):
            return loss_fn(model, batch, nnx.Rngs(dropout=key))

        (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss, **metrics,
                                               "grad_norm": optax.tree.norm(grads)}

    rep = shd.replicated(mesh)
    return jax.jit(step, in_shardings=(rep, shd.data_sharding(mesh)), out_shardings=(rep, rep),
                   donate_argnums=0)


def _loop(step_fn, state, batches, manager, writer, mesh, graphdef, *, start, num_steps,
          log_every, lr_schedule, image_summary_fn, batch_size_key, desc, eval_fn=None,
          eval_every=0):
    """Runs steps ``start+1 .. num_steps``: train, accumulate metrics, log, checkpoint."""
    sums, count, tick = None, 0, time.perf_counter()
    first_bad = None
    bar = tqdm.tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    with bar:
        for step in range(start + 1, num_steps + 1):
            host_batch = next(batches)
            batch = shd.shard_batch(host_batch, mesh, config_key=batch_size_key)
            state, metrics = step_fn(state, batch)
            sums = metrics if sums is None else _tree_add(sums, metrics)
            first_bad = _track_divergence(_no_divergence(metrics) if first_bad is None
                                          else first_bad, metrics, step)
            count += 1
            bar.update(1)
            log_now = step % log_every == 0 or step == num_steps
            save_now = step == num_steps or manager.should_save(step)
            eval_now = eval_fn is not None and eval_every and (step % eval_every == 0
                                                               or step == num_steps)
            if log_now or save_now or eval_now:
                _raise_if_diverged(first_bad, desc, manager)
            if log_now:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                scalars = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                scalars["steps_per_sec"] = count / elapsed
                if lr_schedule is not None:
                    scalars["learning_rate"] = float(lr_schedule(step - 1))
                writer.write_scalars(step, scalars)
                if image_summary_fn is not None:
                    writer.write_images(step, _images(image_summary_fn, graphdef, state,
                                                      host_batch))
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                sums, count = None, 0
            if save_now:
                checkpoints.save_train_state(manager, step, state)
            if eval_now:
                eval_fn(step, _eval_model(graphdef, state))
    return state


@jax.jit
def _tree_add(a, b):
    """Adds two metric dicts on device (no host transfer)."""
    return jax.tree_util.tree_map(jnp.add, a, b)


def _no_divergence(metrics: dict) -> dict:
    """The initial divergence record: no bad step (0), zero metrics shaped like ``metrics``."""
    return {"step": jnp.zeros((), jnp.int32), "metrics": jax.tree_util.tree_map(jnp.zeros_like,
                                                                                metrics)}


@jax.jit
def _track_divergence(record: dict, metrics: dict, step) -> dict:
    """Updates on device the record of the first step (1-based) whose loss or gradient norm
    is not finite, with that step's metrics; a few scalar operations, no host transfer."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    first = (record["step"] == 0) & ~finite
    return {"step": jnp.where(first, step, record["step"]),
            "metrics": jax.tree_util.tree_map(lambda old, new: jnp.where(first, new, old),
                                              record["metrics"], metrics)}


def _raise_if_diverged(record: dict, desc: str, manager: ocp.CheckpointManager) -> None:
    """Raises DivergenceError naming the run, the first bad step, its loss terms and gradient
    norm, and the last good checkpoint, when ``record`` holds a bad step (a host fetch)."""
    record = jax.device_get(record)
    step = int(record["step"])
    if not step:
        return
    values = ", ".join(f"{k}={float(v):.6g}" for k, v in record["metrics"].items())
    last = manager.latest_step()
    where = (f"the last good checkpoint is step {last} in {manager.directory} (left as it was; "
             "a rerun resumes from it)" if last is not None
             else f"no checkpoint had been saved in {manager.directory}")
    raise DivergenceError(
        f"{desc}: training diverged at step {step}: the loss or the gradient norm is not "
        f"finite ({values}). Nothing from step {step} on was saved; {where}. Lower the learning "
        "rate, or start from converted ImageNet weights (init_from) instead of random weights.")


def _eval_model(graphdef, state) -> nnx.Module:
    """An eval-mode model merged from the train state (shares its arrays)."""
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return model


def _images(image_summary_fn, graphdef, state, host_batch) -> dict[str, np.ndarray]:
    """Calls ``image_summary_fn`` on an eval-mode copy of the current model."""
    model = _eval_model(graphdef, state)
    return {k: np.asarray(v) for k, v in image_summary_fn(model, host_batch).items()}
