"""Checkpoints of the training loop and of inference: orbax save, integrity digests, restore.

Checkpoints (orbax, two items ``model`` and ``opt``) are saved by ``trainer.train`` every
``ckpt_every`` steps and after the last step; once a save has completed, a digest of its files
(``DIGEST_FILE``: size and sha256 of each) is written into the step's folder. Both restores
check it, differently:

* resuming training (:func:`restore_train_state`) takes the newest intact step; damaged newer
  steps are moved aside to ``<ckpt_dir>.damaged/`` and trained again (the pipeline's stage
  planner then treats the stage as retrained: everything made from the old model is stale);
* inference (:func:`restore_model`) loads exactly the step it is given, the final one a
  completed stage recorded, and stops with :class:`CheckpointError` naming it when that step
  is damaged or gone: never an older model in its place.

A failed write (e.g. the disk is full) is a :class:`CheckpointError` naming the step, the
folder and the newest complete step a rerun resumes from.
"""

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from pmm_jax.files import safe_io
from pmm_jax.training import distributed
from pmm_jax.training import sharding as shd

log = logging.getLogger(__name__)

# Written into each checkpoint step's folder once its save completed:
# {path relative to the step folder: {"size", "sha256"}}.
DIGEST_FILE = "pmm_digest.json"


class CheckpointError(RuntimeError):
    """A checkpoint a run needs is damaged or missing, or one could not be written; the
    message names the folder, the step and what to do."""


def latest_step(ckpt_dir: str) -> int | None:
    """The step of the newest intact checkpoint in ``ckpt_dir`` (see ``_damage``); None when
    there is none."""
    if not epath.Path(ckpt_dir).exists():
        return None
    with manager(ckpt_dir, read_only=True) as mgr:
        for step in sorted(mgr.all_steps(), reverse=True):
            if _damage(_step_dir(mgr, step), ("model",)) is None:
                return step
    return None


def restore_model(model: nnx.Module, ckpt_dir: str, *, step: int, hint: str) -> nnx.Module:
    """Loads the model part of checkpoint ``step`` in ``ckpt_dir`` into ``model`` (in place)
    and returns it, replicated over all devices and in eval mode; the optimizer state is not
    read.

    Exactly that step: when it is missing, damaged (its digest does not match) or unreadable
    this raises :class:`CheckpointError` naming the folder, the step, the newest intact step
    and ``hint`` (what to run, e.g. "run stage 'cls' again: it retrains the damaged step")
    rather than quietly loading an older model. ``FileNotFoundError("no checkpoint in <dir>:
    <hint>")`` when the folder has no checkpoint at all.
    """
    if not epath.Path(ckpt_dir).exists():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: {hint}")
    state = shd.replicate(nnx.state(model), shd.make_mesh())
    with manager(ckpt_dir, read_only=True) as mgr:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: {hint}")
        problem = (_damage(_step_dir(mgr, step), ("model",)) if step in steps
                   else "is missing")
        if problem is None:
            try:
                restored = mgr.restore(step, args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(_abstract(state))))
            except Exception as err:  # orbax/tensorstore raise many types for unreadable data
                problem = f"is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        if problem is not None:
            problem = problem if problem.startswith("is ") else f"is damaged ({problem})"
            intact = [s for s in steps if _damage(_step_dir(mgr, s), ("model",)) is None]
            newest = f"the newest intact step is {intact[-1]}" if intact else "no step is intact"
            raise CheckpointError(
                f"checkpoint step {step} in {ckpt_dir}, the final one, {problem}; {newest}, but "
                f"an older model is never used in its place: {hint}")
    _load(state, restored["model"])
    nnx.update(model, state)
    model.eval()
    return model


def manager(ckpt_dir: str, *, save_interval_steps: int = 1, read_only: bool = False,
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
    ``restore_model(..., step=step)`` reads it. For best-so-far checkpoints; every process
    calls it."""
    with manager(ckpt_dir, max_to_keep=1) as mgr:
        _save(mgr, step, ocp.args.Composite(
            model=ocp.args.StandardSave(_saveable(nnx.state(model)))))


def save_train_state(mgr: ocp.CheckpointManager, step: int, state: nnx.State) -> None:
    """Saves the train state ``(model, optimizer)`` as step ``step`` (items ``model`` and
    ``opt``) and its digest."""
    _save(mgr, step, ocp.args.Composite(model=ocp.args.StandardSave(_saveable(state[0])),
                                        opt=ocp.args.StandardSave(_saveable(state[1]))))


# After a failed save, how long tensorstore's threads get to print their last errors into the
# hold (they complete writes after orbax gave up on them).
_WRITER_GRACE_S = 1.0


@contextlib.contextmanager
def _stderr_held() -> Iterator[None]:
    """Holds back what is written to file descriptor 2 inside the block and writes it out
    after a block that succeeded; after one that raised it is dropped. A failed orbax save
    (a full disk) has its writer threads log errors with tracebacks and tensorstore's threads
    print "Event loop is closed" tracebacks (from C, past any Python hook), dozens in all,
    before :func:`_save` can say what happened in one paragraph. Read by a thread through a
    pipe: nothing is written to the (maybe full) disk."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    held = bytearray()

    def drain():
        while chunk := os.read(read_end, 1 << 16):
            held.extend(chunk)

    reader = threading.Thread(target=drain, name="stderr_held", daemon=True)
    reader.start()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone: the reader sees its end
        os.close(saved)
        reader.join()
        os.close(read_end)
        if ok and held:
            os.write(2, bytes(held))


def _save(mgr: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
    """Saves ``step``, waits until it is complete, then writes its digest (process 0). A
    failed write (a full disk, a vanished folder) is a CheckpointError naming the step and the
    newest complete one, from which a rerun resumes; what orbax's threads print about it is
    dropped (:func:`_stderr_held`)."""
    try:
        with _stderr_held():
            try:
                mgr.save(step, args=args, force=True)
                mgr.wait_until_finished()
            except Exception:
                # The writer threads may still be failing: let them end (and print) in the hold.
                with contextlib.suppress(Exception):
                    mgr.wait_until_finished()
                time.sleep(_WRITER_GRACE_S)
                raise
        if distributed.is_main():
            step_dir = _step_dir(mgr, step)
            safe_io.write_json(os.path.join(step_dir, DIGEST_FILE), _digest(step_dir))
    except Exception as err:  # orbax wraps the OSError in several exception types
        cause = " ".join(str(err).split())[:300]
        complete = [s for s in mgr.all_steps(read=True) if s != step]
        resume = f"step {max(complete)}" if complete else "the start"
        raise CheckpointError(
            f"could not write checkpoint step {step} in {mgr.directory} ({type(err).__name__}: "
            f"{cause}). Free disk space (or fix the cause) and rerun the same command: training "
            f"resumes from {resume}.") from err


def _step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(mgr.directory), str(step))


def _digest(step_dir: str) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file in a step folder but the digest."""
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != DIGEST_FILE:
                out[rel] = {"size": os.path.getsize(path), "sha256": safe_io.file_sha256(path)}
    return out


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
        expected = safe_io.read_json(digest_path)
    except (OSError, ValueError) as err:
        return f"unreadable {DIGEST_FILE}: {err}"
    for rel, want in sorted(expected.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"{rel} has {os.path.getsize(path)} bytes, {want['size']} were saved"
        if safe_io.file_sha256(path) != want["sha256"]:
            return f"{rel} differs from what was saved (sha256 mismatch)"
    return None


def _restore_newest_intact(mgr: ocp.CheckpointManager, restore: Callable[[int], Any],
                           items: tuple[str, ...]) -> tuple[int, Any] | None:
    """``(step, restore(step))`` for the newest step that is intact and restores (training
    resumes there); damaged steps are skipped with a warning. None without steps;
    CheckpointError when all are damaged."""
    problems = []
    for step in sorted(mgr.all_steps(), reverse=True):
        problem = _damage(_step_dir(mgr, step), items)
        if problem is None:
            try:
                return step, restore(step)
            except Exception as err:  # orbax/tensorstore raise many types for unreadable data
                problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        problems.append(f"step {step}: {problem}")
        log.warning("checkpoint step %d in %s is damaged (%s); trying an earlier step", step,
                    mgr.directory, problem)
    if problems:
        raise CheckpointError(
            f"no intact checkpoint in {mgr.directory} ({'; '.join(problems)}); delete that "
            "folder to train this model again from scratch")
    return None


def restore_train_state(mgr: ocp.CheckpointManager, state: nnx.State) -> int:
    """Loads the newest intact checkpoint into ``state`` (in place); returns its step (0 if
    none). Damaged newer steps are moved to ``<ckpt_dir>.damaged/`` so that they are redone."""
    model_state, opt_state = state[0], state[1]
    found = _restore_newest_intact(mgr, lambda step: mgr.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(model_state)),
                                      opt=ocp.args.StandardRestore(_abstract(opt_state)))),
        ("model", "opt"))
    step = found[0] if found else 0
    damaged = [s for s in mgr.all_steps() if s > step]
    if damaged:
        if distributed.is_main():
            aside = f"{mgr.directory}.damaged"
            os.makedirs(aside, exist_ok=True)
            for s in damaged:
                os.replace(_step_dir(mgr, s), os.path.join(aside, f"{s}-{time.time():.0f}"))
        distributed.barrier(f"checkpoint-damaged-set-aside-{mgr.directory}")
        mgr.reload()
    if found is None:
        return 0
    _load(model_state, found[1]["model"])
    _load(opt_state, found[1]["opt"])
    return step


def _saveable(state: nnx.State) -> dict:
    """The state as a pure nested dict, typed PRNG keys as their raw uint32 data."""
    return jax.tree_util.tree_map(
        lambda x: jax.random.key_data(x) if is_key(x) else x, nnx.to_pure_dict(state))


def _abstract(state: nnx.State) -> dict:
    """Restore target: shapes, dtypes and shardings of ``_saveable(state)``."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saveable(state))


def _load(state: nnx.State, restored: dict) -> None:
    """Writes restored arrays into ``state`` in place, re-wrapping raw PRNG key data."""
    current = nnx.to_pure_dict(state)
    values = jax.tree_util.tree_map(
        lambda old, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
        if is_key(old) else new, current, restored)
    nnx.replace_by_pure_dict(state, values)


def is_key(x: Any) -> bool:
    """True for typed PRNG key arrays (``jax.random.key``), which orbax cannot store as is."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
