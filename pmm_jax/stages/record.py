"""What a stage ran with and what it left behind, so that a rerun can tell whether it still holds.

A stage's marker records (besides its time and metrics) ``config``: the config keys that affect
its results (:func:`relevant_config`), ``inputs``: the ids of the earlier stages' markers it
ran after, ``id``: its own id, and ``outputs``: what it wrote (:func:`measure_outputs`: file
counts per folder, the step of each checkpoint). ``pmm_jax.stages.planner.plan`` compares them with
the current config and workdir before anything runs.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pmm_jax.files.workdir import STAGES, Workdir
from pmm_jax.stages.stage import declared

if TYPE_CHECKING:  # ml_collections is not needed to import a stage (the benchmarks do)
    import ml_collections

# Keys that change how a stage runs (speed, logging, where data is read from, which stages
# run), not what it computes: changing them never makes a completed stage stale. (``*.remat``:
# rematerialisation recomputes the same activations, pmm_jax/models/remat.py.)
NO_EFFECT = ("stages", "data.data_dir", "*.log_every", "*.ckpt_every", "*num_workers",
             "*crf_workers", "cam.batch_size", "eval.batch_size", "cam.multicrop.tile_batch",
             "*.model.remat", "compilation_cache", "plugins")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": (1, 2)}}`` -> ``{"a.b": [1, 2]}``: values as JSON stores them."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


@functools.cache
def _sections() -> dict[str, str]:
    """``{config key prefix: the stage declaring it}``."""
    return {section: name for name in STAGES for section in declared(name).sections}


def first_affected(key: str) -> str:
    """The first stage whose results ``key`` affects: the stage declaring the longest
    section (a dotted prefix) that ``key`` starts with; a key no stage declares (``seed``,
    ``data.*``, any new key) affects every stage, so the first one."""
    sections = _sections()
    matches = [p for p in sections if key == p or key.startswith(p + ".")]
    return sections[max(matches, key=len)] if matches else STAGES[0]


def relevant_config(config: ml_collections.ConfigDict, stage: str, order: Sequence[str]
                    ) -> dict[str, Any]:
    """The flattened config keys that affect ``stage``: its own and every earlier stage's."""
    upto = order.index(stage)
    return {key: value for key, value in flatten(config.to_dict()).items()
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in NO_EFFECT)
            and order.index(first_affected(key)) <= upto}


def changed_keys(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key both hold with different values (a key only one
    holds was added or removed by a code change, not by the user)."""
    return [f"{key}: {recorded[key]!r} -> {current[key]!r}" for key in sorted(recorded)
            if key in current and recorded[key] != current[key]]


def outputs(config, wd: Workdir, stage: str) -> dict[str, str]:
    """``{path: kind}`` of what ``stage`` writes (its declared ``writes``)."""
    return declared(stage).writes(config, wd)


def owned_paths(config, wd: Workdir, stage: str) -> list[str]:
    """Everything ``stage`` writes (its declared ``owns``): what ``--redo`` deletes."""
    return declared(stage).owns(config, wd)


def producer_of(config, wd: Workdir, path: str, order: Sequence[str]) -> str | None:
    """The stage whose outputs hold ``path`` (a file in one of its output folders), or None."""
    path = os.path.abspath(path)
    for stage in order:
        for output in outputs(config, wd, stage):
            output = os.path.abspath(output)
            if path == output or path.startswith(output + os.sep):
                return stage
    return None


def remove(paths: Sequence[str]) -> None:
    """Deletes files and folders (absent ones are fine)."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _count_files(directory: str) -> int:
    if not os.path.isdir(directory):
        return 0
    return sum(1 for name in os.listdir(directory) if not name.startswith("."))


def measure_outputs(config, wd: Workdir, stage: str) -> dict[str, int]:
    """``{path relative to the workdir: count}``: files in each folder, the step of the newest
    intact checkpoint (0 when none), 1 for a file that exists."""
    from pmm_jax.training import checkpoints

    out = {}
    for path, kind in outputs(config, wd, stage).items():
        if kind == "files":
            count = _count_files(path)
        elif kind == "checkpoint":
            count = checkpoints.latest_step(path) or 0
        else:
            count = int(os.path.exists(path))
        out[os.path.relpath(path, wd.root)] = count
    return out


def _note(path: str, kind: str, now: int, want: int) -> str:
    if kind == "checkpoint":
        return f"{path} has no intact checkpoint of step {want} (newest intact: {now or 'none'})"
    if kind == "files":
        return f"{path} holds {now} of its {want} files"
    return f"{path} is missing"


def missing_outputs(config, wd: Workdir, stage: str, recorded: Mapping[str, int]) -> list[str]:
    """What a completed stage no longer has, compared with its marker's ``outputs``."""
    kinds = {os.path.relpath(p, wd.root): k for p, k in outputs(config, wd, stage).items()}
    now = measure_outputs(config, wd, stage)
    return [_note(path, kinds.get(path, "files"), now.get(path, 0), want)
            for path, want in sorted(recorded.items()) if now.get(path, 0) < want]


def checkpoint_lost(config, wd: Workdir, stage: str, recorded: Mapping[str, int]) -> bool:
    """Whether a completed stage's checkpoint no longer holds the step its marker records
    (damaged or deleted): the stage must train again, from an older step or from scratch."""
    kinds = {os.path.relpath(p, wd.root): k for p, k in outputs(config, wd, stage).items()}
    checkpoints = {path: want for path, want in recorded.items()
                   if kinds.get(path) == "checkpoint"}
    if not checkpoints:
        return False
    now = measure_outputs(config, wd, stage)
    return any(now.get(path, 0) < want for path, want in checkpoints.items())


def unfinished_outputs(config, wd: Workdir, stage: str, measured: Mapping[str, int]
                       ) -> list[str]:
    """What a stage that just ran failed to write: each checkpoint must be at the configured
    final step the stage declares, a declared file must exist."""
    notes = []
    for path, kind in outputs(config, wd, stage).items():
        rel = os.path.relpath(path, wd.root)
        if kind == "checkpoint":
            want = declared(stage).final_step(config)
            if measured[rel] != want:
                notes.append(_note(rel, kind, measured[rel], want))
        elif kind == "file" and not measured[rel]:
            notes.append(_note(rel, kind, 0, 1))
    return notes
