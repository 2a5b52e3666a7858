"""Where every stage's inputs and outputs live inside a run's workdir.

All paths are derived here so that stages, notebooks and tests agree on one layout
(documented in docs/design.md). :func:`lock` keeps a second run out of a workdir in use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
from typing import Iterator

# The pipeline's stages in order: each leaves its marker ``stages/<name>.json`` and its
# outputs in this layout; ``pmm_jax.stages`` declares what each reads and writes.
STAGES = ("cls", "cam", "pseudo", "seg", "cycle", "eval")


def parse_stages(spec: str, flag: str = "--config.stages") -> list[str]:
    """Parses ``"cls,cam"`` into stage names in pipeline order; unknown names are an error
    naming ``flag``."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in {flag}={spec!r}; "
                         f"known stages in order: {','.join(STAGES)}")
    if not names:
        raise ValueError(f"{flag} is empty; choose from " + ",".join(STAGES))
    return sorted(set(names), key=STAGES.index)


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of one run's outputs under ``root``."""

    root: str

    def data_dir(self, configured: str = "") -> str:
        """The tensorflow-datasets data_dir: the configured one (``~`` expanded, as in the
        documented ``--config.data.data_dir=~/tfds``), else ``root/tfds``."""
        return os.path.expanduser(configured) if configured else os.path.join(self.root, "tfds")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.root, ".lock")

    @property
    def config_json(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def dataset_json(self) -> str:
        """The run's dataset as trained on (name, class names, canvas): what
        ``pmm_jax.predict`` and ``pmm_jax.export`` need without reopening the dataset."""
        return os.path.join(self.root, "dataset.json")

    @property
    def results_json(self) -> str:
        return os.path.join(self.root, "results.json")

    def stage_marker(self, stage: str) -> str:
        return os.path.join(self.root, "stages", f"{stage}.json")

    def ckpt_dir(self, model: str) -> str:
        """Checkpoints of a trained model: ``cls`` or a segmenter run such as ``seg/pus``."""
        return os.path.join(self.root, model, "ckpt")

    def log_dir(self, model: str) -> str:
        return os.path.join(self.root, model, "tb")

    def cams(self, split: str) -> str:
        return os.path.join(self.root, "cams", split)

    def pseudo_masks(self, variant: str, split: str = "train") -> str:
        return os.path.join(self.root, "pseudo", variant, split)

    def rough_masks(self, split: str = "train") -> str:
        """Rough masks of multi-crop training (``pseudo_masks --method=rough``)."""
        return os.path.join(self.root, "rough_masks", split)

    def predictions(self, run: str, split: str) -> str:
        return os.path.join(self.root, "predictions", run, split)


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


def holder(wd: Workdir) -> str:
    """``host H pid P``: who holds (or last held) the workdir's lock, as its file says."""
    try:
        with open(wd.lock_file) as f:
            return f.read().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


def busy_message(wd: Workdir) -> str:
    return (f"{wd.root} is in use by another run ({holder(wd)}, see {wd.lock_file}); wait for "
            "it to finish or stop it, or use another --workdir")


@contextlib.contextmanager
def lock(wd: Workdir) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``WORKDIR/.lock`` (host and pid written in it) for the
    duration; raises WorkdirBusyError naming the holder when another process has it. The
    kernel drops the lock when its process dies, so a killed run never leaves it behind.
    On a shared filesystem (NFS v4, Lustre, GPFS) ``flock`` reaches across hosts."""
    fd = os.open(wd.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(busy_message(wd)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def made_by(stage: str) -> str:
    """What to do when a checkpoint that stage ``stage`` writes is missing or damaged."""
    return (f"it is made by stage '{stage}': include {stage} in --config.stages and rerun (it "
            "trains again from its newest intact step; the stages made from the old model are "
            "then refused until redone with --redo)")
