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

Resuming: checkpoints (orbax, two items ``model`` and ``opt``) are saved every ``ckpt_every``
steps and after the last step; once a save has completed, a digest of its files
(``DIGEST_FILE``: size and sha256 of each) is written into the step's folder. Restoring checks
it: a step whose files were changed, truncated or removed is skipped with a warning for the
newest intact one (training moves the damaged steps aside to ``<ckpt_dir>.damaged/`` and
redoes them); ``CheckpointError`` when no step is intact.
``train`` restores the latest one and continues from its step; a
run that is already complete returns the restored model without compiling anything. The data
iterator is the caller's: a resumed run must hand ``train`` an iterator whose first batch is the
one for step ``latest_step(ckpt_dir)`` (0 when ``None``), e.g. by skipping or re-seeding its
pipeline with that step. Every process runs the same loop and calls ``save``; orbax coordinates
the processes and writes the replicated arrays once.

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

import hashlib
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from pmm_jax.files import io
from pmm_jax.training import distributed
from pmm_jax.training import sharding as shd

log = logging.getLogger(__name__)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm; nothing after it was saved."""


# Written into each checkpoint step's folder once its save completed:
# {path relative to the step folder: {"size", "sha256"}}.
DIGEST_FILE = "pmm_digest.json"

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], nnx.Rngs],
                  tuple[jax.Array, Mapping[str, jax.Array]]]


def sgd_poly(lr: float, num_steps: int, *, momentum: float = 0.9, weight_decay: float = 5e-4,
             power: float = 0.9, end_lr: float = 0.0, decay_1d: bool = False
             ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, L2 weight decay and poly learning-rate decay; returns (tx, schedule).

    ``lr(k) = (lr - end_lr) * (1 - k / num_steps) ** power + end_lr`` for update k = 0..num_steps
    (mmcv's ``PolyLrUpdaterHook`` with ``min_lr=end_lr``). Weight decay is added to the gradient
    before momentum (PyTorch ``SGD(weight_decay=...)``, as in the official PMM/mmseg code).
    ``decay_1d=True`` decays every parameter, as PyTorch's SGD over all of a model's parameters
    does (mmseg's segmenters); False decays only parameters with two or more dimensions (conv
    and dense kernels), leaving biases and BatchNorm scales/offsets (1-D) undecayed.
    """
    schedule = optax.polynomial_schedule(init_value=lr, end_value=end_lr, power=power,
                                         transition_steps=num_steps)
    decay_mask = None if decay_1d else (
        lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params))
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=momentum))
    return tx, schedule


class CheckpointError(RuntimeError):
    """No intact checkpoint in a checkpoint folder that has steps."""


def latest_step(ckpt_dir: str) -> int | None:
    """The step of the newest intact checkpoint in ``ckpt_dir`` (see ``_damage``); None when
    there is none."""
    if not epath.Path(ckpt_dir).exists():
        return None
    with _manager(ckpt_dir, read_only=True) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            if _damage(_step_dir(manager, step), ("model",)) is None:
                return step
    return None


def restore_model(model: nnx.Module, ckpt_dir: str, hint: str) -> nnx.Module:
    """Loads the model part of the newest intact checkpoint into ``model`` (in place) and
    returns it.

    The optimizer state is not read. The model is replicated over all devices and set to eval
    mode. Raises ``FileNotFoundError("no checkpoint in <dir>: <hint>")`` when there is none;
    ``hint`` tells the user what to run, e.g. "run stage cls first"; ``CheckpointError``
    when every step is damaged.
    """
    if not epath.Path(ckpt_dir).exists():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: {hint}")
    state = replicate(nnx.state(model), shd.make_mesh())
    with _manager(ckpt_dir, read_only=True) as manager:
        found = _restore_newest_intact(manager, lambda step: manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(state)))),
            ("model",))
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: {hint}")
    _load(state, found[1]["model"])
    nnx.update(model, state)
    model.eval()
    return model


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
    state = replicate(state, mesh)
    with _manager(ckpt_dir, save_interval_steps=ckpt_every) as manager:
        start = _restore_train_state(manager, state)
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
    mesh = shd.make_mesh()
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)

    def apply(state, batch):
        eval_model = nnx.merge(graphdef, state)
        eval_model.eval()
        return fn(eval_model, batch)

    jitted = jax.jit(apply, in_shardings=(shd.replicated(mesh), shd.data_sharding(mesh)),
                     out_shardings=shd.data_sharding(mesh))

    def predict(batch: Mapping[str, np.ndarray]) -> Any:
        out = jitted(state, shd.shard_batch(batch, mesh, config_key=batch_size_key))
        local = multihost_utils.global_array_to_host_local_array(
            out, mesh, PartitionSpec(shd.DATA_AXIS))
        return jax.device_get(local)

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
                _save(manager, step, _save_args(state))
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


def _manager(ckpt_dir: str, *, save_interval_steps: int = 1, read_only: bool = False,
             max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager keeping the last ``max_to_keep`` checkpoints, saving every
    ``save_interval_steps``."""
    return ocp.CheckpointManager(
        epath.Path(ckpt_dir).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            create=not read_only, read_only=read_only))


def save_model(model: nnx.Module, ckpt_dir: str, step: int) -> None:
    """Writes ``model`` (its ``model`` item only) as the one checkpoint kept in ``ckpt_dir``;
    ``restore_model`` reads it. For best-so-far checkpoints; every process calls it."""
    with _manager(ckpt_dir, max_to_keep=1) as manager:
        _save(manager, step, ocp.args.Composite(
            model=ocp.args.StandardSave(_saveable(nnx.state(model)))))


def _save(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
    """Saves ``step``, waits until it is complete, then writes its digest (process 0)."""
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()
    if distributed.is_main():
        step_dir = _step_dir(manager, step)
        io.write_json(os.path.join(step_dir, DIGEST_FILE), _digest(step_dir))


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _digest(step_dir: str) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file in a step folder but the digest."""
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != DIGEST_FILE:
                out[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return out


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _damage(step_dir: str, items: tuple[str, ...]) -> str | None:
    """What is wrong with a saved step, or None: a missing item folder, or a file missing or
    of another size or sha256 than its digest says. A step without a digest (saved by older
    code, or killed between its save and the digest) is only checked for its items."""
    missing = [item for item in items if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
        return f"item {missing[0]}/ is missing"
    digest_path = os.path.join(step_dir, DIGEST_FILE)
    if not os.path.exists(digest_path):
        return None
    try:
        expected = io.read_json(digest_path)
    except (OSError, ValueError) as err:
        return f"unreadable {DIGEST_FILE}: {err}"
    for rel, want in sorted(expected.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"{rel} has {os.path.getsize(path)} bytes, {want['size']} were saved"
        if _sha256(path) != want["sha256"]:
            return f"{rel} differs from what was saved (sha256 mismatch)"
    return None


def _restore_newest_intact(manager: ocp.CheckpointManager, restore: Callable[[int], Any],
                           items: tuple[str, ...]) -> tuple[int, Any] | None:
    """``(step, restore(step))`` for the newest step that is intact and restores; damaged
    steps are skipped with a warning. None without steps; CheckpointError when all are damaged."""
    problems = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = _damage(_step_dir(manager, step), items)
        if problem is None:
            try:
                return step, restore(step)
            except Exception as err:  # orbax/tensorstore raise many types for unreadable data
                problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        problems.append(f"step {step}: {problem}")
        log.warning("checkpoint step %d in %s is damaged (%s); trying an earlier step", step,
                    manager.directory, problem)
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {manager.directory} ({'; '.join(problems)}); delete that "
            "folder to train this model again from scratch")
    return None


def _restore_train_state(manager: ocp.CheckpointManager, state: nnx.State) -> int:
    """Loads the newest intact checkpoint into ``state`` (in place); returns its step (0 if
    none). Damaged newer steps are moved to ``<ckpt_dir>.damaged/`` so that they are redone."""
    model_state, opt_state = state[0], state[1]
    found = _restore_newest_intact(manager, lambda step: manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(model_state)),
                                      opt=ocp.args.StandardRestore(_abstract(opt_state)))),
        ("model", "opt"))
    step = found[0] if found else 0
    damaged = [s for s in manager.all_steps() if s > step]
    if damaged:
        if distributed.is_main():
            aside = f"{manager.directory}.damaged"
            os.makedirs(aside, exist_ok=True)
            for s in damaged:
                os.replace(_step_dir(manager, s), os.path.join(aside, f"{s}-{time.time():.0f}"))
        distributed.barrier(f"checkpoint-damaged-set-aside-{manager.directory}")
        manager.reload()
    if found is None:
        return 0
    _load(model_state, found[1]["model"])
    _load(opt_state, found[1]["opt"])
    return step


def _save_args(state: nnx.State) -> ocp.args.Composite:
    """Checkpoint items: ``model`` (what inference needs) and ``opt`` (optimizer state)."""
    return ocp.args.Composite(model=ocp.args.StandardSave(_saveable(state[0])),
                              opt=ocp.args.StandardSave(_saveable(state[1])))


def _saveable(state: nnx.State) -> dict:
    """The state as a pure nested dict, typed PRNG keys as their raw uint32 data."""
    return jax.tree_util.tree_map(
        lambda x: jax.random.key_data(x) if _is_key(x) else x, nnx.to_pure_dict(state))


def _abstract(state: nnx.State) -> dict:
    """Restore target: shapes, dtypes and shardings of ``_saveable(state)``."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saveable(state))


def _load(state: nnx.State, restored: dict) -> None:
    """Writes restored arrays into ``state`` in place, re-wrapping raw PRNG key data."""
    current = nnx.to_pure_dict(state)
    values = jax.tree_util.tree_map(
        lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
        if _is_key(old) else new, current, restored)
    nnx.replace_by_pure_dict(state, values)


def _is_key(x: Any) -> bool:
    """True for typed PRNG key arrays (``jax.random.key``), which orbax cannot store as is."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """Puts every array of ``state`` on all devices (a no-op for already replicated arrays).

    With several processes ``device_put`` cannot target other hosts' devices: each process
    contributes its own (identical) copy through ``make_array_from_process_local_data``.
    """
    sharding = shd.replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(state, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array
        if _is_key(x):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(put, state)
