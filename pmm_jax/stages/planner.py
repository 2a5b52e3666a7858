"""The planner: which stages run, and the bookkeeping that makes runs resumable.

Each stage module declares itself (``STAGE``, ``pmm_jax.stages.stage.Stage``); its ``run(config,
workdir, data) -> dict`` returns its metrics, ``data`` being the run's dataset
(``pmm_jax.data.dataset.Dataset``, opened once by ``pmm_jax.main``). A finished stage
leaves a marker ``WORKDIR/stages/<name>.json`` holding its wall seconds, metrics and what it ran
with and wrote (``pmm_jax.stages.record``); a rerun skips it. Inside a stage, finished items
(checkpoints, CAM files, masks) are skipped too, so a killed stage resumes where it stopped.

Before anything runs, :func:`plan` decides each stage's action: a completed stage whose
settings or inputs differ from this run's is refused (``StaleStageError``) unless named in
``--redo`` (its outputs are deleted and it runs again); one whose files have gone missing
runs again to redo them, keeping its identity; one whose final checkpoint is damaged retrains
from its newest intact step as a new model, so the stages made from the old one are refused
until redone. A stage that meets a damaged file of an earlier stage stops with one paragraph
naming the file and the ``--redo`` that remakes it (:func:`damaged_input`). docs/faults.md.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Mapping

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import STAGES, Workdir, parse_stages
from pmm_jax.stages import record
from pmm_jax.stages.stage import declared
from pmm_jax.training import distributed

if TYPE_CHECKING:  # ml_collections is not needed to import a stage (the benchmarks do)
    import ml_collections

    from pmm_jax.data.dataset import Dataset

log = logging.getLogger(__name__)

ORDER = STAGES


def needs(name: str, config: ml_collections.ConfigDict) -> list[str]:
    """Every stage whose outputs ``name`` reads (its declaration's ``needs``)."""
    return declared(name).needs(config)


class StageError(RuntimeError):
    """The workdir does not allow a stage to run, or a stage did not write its outputs."""


class StageInputError(StageError):
    """A stage's inputs are missing from the workdir."""


class StaleStageError(StageError):
    """Completed stages were made with other settings or inputs than this run's."""


class DamagedInputError(StageError):
    """A stage met an unreadable file that an earlier stage wrote (truncated, corrupt)."""


class StageOutputError(StageError):
    """A stage finished without writing all of its outputs."""


def check_inputs(name: str, wd: Workdir) -> None:
    """Raises StageInputError naming the stage to run first when ``name``'s input is missing."""
    needed = declared(name).requires
    if needed and not os.path.exists(wd.stage_marker(needed)):
        raise StageInputError(
            f"stage '{name}' needs the output of stage '{needed}', which has not completed in "
            f"{wd.root} (no {wd.stage_marker(needed)}); run it first, e.g. "
            f"--config.stages={needed},{name}")


def completed(wd: Workdir) -> Mapping[str, dict]:
    """Markers of every completed stage: ``{stage: {"seconds": .., "metrics": {..}}}``."""
    return {name: marker for name in ORDER
            if (marker := _read_marker(wd, name)) is not None}


def _read_record(path: str, name: str, what: str) -> dict | None:
    """The JSON object in ``path`` (stage ``name``'s ``what``), None when absent; StageError
    naming the file and the ``--redo`` when it is empty, not JSON or not an object (e.g. cut
    short by a power loss on a filesystem that does not order writes)."""
    if not os.path.exists(path):
        return None
    try:
        value = safe_io.read_json(path)
    except (OSError, ValueError) as err:
        problem = f"is not readable JSON ({' '.join(str(err).split())})"
    else:
        if isinstance(value, dict) and isinstance(value.get("outputs", {}), dict):
            return value
        problem = f"holds a {type(value).__name__}, not a stage record"
    raise StageError(f"{what} {path} {problem}: it is damaged, so what stage {name} made is "
                     f"unknown. Rerun with --redo={name} (the stage runs again from scratch; "
                     "later stages made from it are then refused until redone too).")


def _started_path(wd: Workdir, name: str) -> str:
    """Written when a stage starts: the settings its partial outputs are made with."""
    return os.path.join(os.path.dirname(wd.stage_marker(name)), f"{name}.started.json")


def _needs_repair(name: str, config, wd: Workdir) -> bool:
    marker = _read_marker(wd, name)
    return bool(marker and record.missing_outputs(config, wd, name, marker.get("outputs", {})))


def _read_marker(wd: Workdir, name: str) -> dict | None:
    """Stage ``name``'s marker, or None when it has not completed (:func:`_read_record`)."""
    return _read_record(wd.stage_marker(name), name, "the stage marker")


def plan(names: list[str], redo: list[str], config: ml_collections.ConfigDict,
         wd: Workdir) -> dict[str, str]:
    """``{stage: action}`` in pipeline order: "skip" (complete and current), "run" (not
    complete: starts or resumes), "redo" (named in ``redo``: outputs deleted, runs again),
    "repair" (complete but files missing: runs again, redoing only those, same identity) or
    "retrain" (complete but its final checkpoint damaged or gone: training resumes from the
    newest intact step and the stage gets a new identity, so every completed stage made from
    the old model is stale). The completed stages a running stage reads (:func:`needs`) are
    repaired or retrained too when their outputs are missing. Raises StaleStageError naming
    every completed (or half-done) stage made with other settings or inputs, or from a stage
    that runs again, the keys, and the ``--redo`` that remakes them."""
    extra = set(redo) - set(names)
    if extra:
        raise StageError(f"--redo names stage(s) {sorted(extra)} that --config.stages="
                         f"{config.stages!r} does not run")
    included = set(names)
    while True:
        actions, stale = _decide_all([n for n in ORDER if n in included], redo, config, wd)
        pulled = {need for name, action in actions.items() if action != "skip"
                  for need in needs(name, config)
                  if need not in included and _needs_repair(need, config, wd)}
        if not pulled:
            break
        included |= pulled
    stale = {name: reasons for name, reasons in stale.items() if reasons}
    if stale:
        reasons = list(dict.fromkeys(r for rs in stale.values() for r in rs))
        again = [n for n in ORDER if n in stale or n in redo]
        also = [n for n in ORDER if n in names or n in again] if set(again) - set(names) else []
        raise StaleStageError(
            f"{wd.root} holds stage(s) {', '.join(n for n in ORDER if n in stale)} made with "
            f"other settings or inputs than this run's ({'; '.join(reasons)}). To redo them "
            f"with this run's settings (their outputs are deleted), add --redo={','.join(again)}"
            + (f" --config.stages={','.join(also)}" if also else "") + "; to keep them, run with "
            f"the settings they were made with (see {os.path.dirname(wd.stage_marker('cls'))}/"
            f"<stage>.json) or use another --workdir.")
    return {name: actions[name] for name in ORDER if name in actions}


def _decide_all(ordered: list[str], redo: list[str], config, wd: Workdir
                ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Each stage's action (in pipeline order, so a stage that runs again is known before
    the stages made from it) and the reasons each completed stage is stale."""
    actions, renewed, stale = {}, set(), {}
    for name in ordered:
        current = record.relevant_config(config, name, ORDER)
        marker = None if name in redo else _read_marker(wd, name)
        if marker is None:
            started = (None if name in redo else _read_record(
                _started_path(wd, name), name, "the record of the half-done stage"))
            if started:
                stale[name] = record.changed_keys(started.get("config", {}), current)
            actions[name] = "redo" if name in redo else "run"
            renewed.add(name)
            continue
        # A marker written before markers held records has no config or inputs to compare.
        reasons = record.changed_keys(marker.get("config", current), current)
        for stage, marker_id in marker.get("inputs", {}).items():
            if stage in renewed:
                reasons.append(f"stage {stage} runs again before {name}"
                               + (" (its final checkpoint is damaged: it retrains from an "
                                  "older step)" if actions.get(stage) == "retrain" else ""))
            elif (_read_marker(wd, stage) or {}).get("id") != marker_id:
                reasons.append(f"stage {stage} was redone after {name}")
        if reasons:
            stale[name] = reasons
            continue
        missing = record.missing_outputs(config, wd, name, marker.get("outputs", {}))
        if missing:
            log.warning("stage %s: complete but %s; running it again to redo what is missing",
                        name, "; ".join(missing))
        retrain = record.checkpoint_lost(config, wd, name, marker.get("outputs", {}))
        actions[name] = "retrain" if retrain else "repair" if missing else "skip"
        if retrain:
            renewed.add(name)
    return actions, stale


def run_stage(name: str, config: ml_collections.ConfigDict, wd: Workdir, data: Dataset,
              action: str = "run") -> dict:
    """Carries out ``name``'s :func:`plan` action on dataset ``data``; returns its marker
    contents."""
    marker = wd.stage_marker(name)
    if action == "skip":
        log.info("stage %s: already complete (%s); skipping", name, marker)
        return _read_marker(wd, name)
    previous = _read_marker(wd, name) if action in ("repair", "retrain") else None
    if action == "redo":
        if distributed.is_main():
            record.remove([marker, _started_path(wd, name),
                           *record.owned_paths(config, wd, name)])
        distributed.barrier(f"stage-{name}-cleared")
    check_inputs(name, wd)
    current = record.relevant_config(config, name, ORDER)
    if distributed.is_main() and not previous:
        safe_io.write_json(_started_path(wd, name), {"config": current})
    log.info("stage %s: %s", name, "redoing missing outputs" if previous else "starting")
    start = time.time()
    try:
        metrics = declared(name).run(config, wd, data)
    except Exception as err:  # a damaged file of an earlier stage, met anywhere in the stage
        damaged = damaged_input(err, name, config, wd)
        if damaged is None:
            raise
        raise damaged from err
    # The marker is written once every process has finished the stage, and no process starts
    # the next stage (whose input check reads the marker) before it exists.
    distributed.barrier(f"stage-{name}-done")
    written = record.measure_outputs(config, wd, name)
    unfinished = record.unfinished_outputs(config, wd, name, written)
    if unfinished:
        raise StageOutputError(f"stage {name} finished without its outputs "
                               f"({'; '.join(unfinished)}); it is not marked complete in {marker}")
    earlier = {n: _read_marker(wd, n) for n in ORDER[:ORDER.index(name)]}
    inputs = {n: m["id"] for n, m in earlier.items() if m is not None and "id" in m}
    result = {"seconds": round(time.time() - start, 2), "metrics": metrics, "config": current,
              "inputs": previous.get("inputs", inputs) if previous else inputs,
              # A repair remakes the same files; a retrained model is another model.
              "id": (previous.get("id", uuid.uuid4().hex) if action == "repair"
                     else uuid.uuid4().hex),
              "outputs": written}
    if distributed.is_main():
        safe_io.write_json(marker, result)
        record.remove([_started_path(wd, name)])
    distributed.barrier(f"stage-{name}-marked")
    log.info("stage %s: done in %.1f s%s", name, result["seconds"],
             "".join(f"; {k}={v:.6f}" for k, v in headline(metrics).items()))
    return result


# A workdir path in an error message, up to the first character that cannot be in one here.
_PATH_CHARS = r"[^\s:'\"()\[\],]+"


def damaged_input(err: BaseException, name: str, config, wd: Workdir
                  ) -> DamagedInputError | None:
    """One paragraph for an error of stage ``name`` that names a file an earlier stage
    wrote (the error may come from a worker process or through TensorFlow, whose message
    carries the Python one and its traceback): the file, what is wrong with it, the stage
    that wrote it and the ``--redo`` that remakes it and everything made from it. None when
    the message names no such file (the error is then not about a damaged input), and for
    errors that already say what to do (a stage error, a checkpoint error, a divergence)."""
    from pmm_jax.training.checkpoints import CheckpointError

    if isinstance(err, (StageError, CheckpointError, FloatingPointError, FileNotFoundError)):
        return None
    text = str(err)
    root = re.escape(os.path.abspath(wd.root))
    for line in text.splitlines():
        match = re.search(rf"({root}/{_PATH_CHARS})", line)
        if not match:
            continue
        path = match.group(1).rstrip(".")
        producer = record.producer_of(config, wd, path, ORDER)
        if producer is None or ORDER.index(producer) > ORDER.index(name):
            continue
        reason = re.sub(r"^\s*(\w+(Error|Exception): )+", "", line).strip()
        redo = [n for n in ORDER[ORDER.index(producer):]
                if n == name or os.path.exists(wd.stage_marker(n))]
        run = [n for n in ORDER if n in redo or n in parse_stages(config.stages)]
        return DamagedInputError(
            f"stage {name} cannot use {path}, written by stage '{producer}' ({reason[:400]}). "
            f"The file is damaged (e.g. truncated by a full disk or an interrupted copy); "
            f"rerun with --config.stages={','.join(run)} --redo={','.join(redo)} to remake it "
            "and everything made from it.")
    return None


def headline(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The mIoU figures of a stage's metrics, flattened (``pseudo_mask_miou.ppmg``).

    They end the stage's log line, so every process reports what it measured (processes
    of one run must agree) and a run's progress can be followed in its log.
    """
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if key.endswith("miou") or prefix:
                out.update(headline(value, name + "."))
        elif isinstance(value, float) and (key.endswith("miou") or prefix):
            out[name] = value
    return out
