"""The pipeline's stages, their order, and the bookkeeping that makes runs resumable.

Each stage module exposes ``run(config, workdir) -> dict`` (its metrics). A finished stage
leaves a marker ``WORKDIR/stages/<name>.json`` holding its wall seconds and metrics; a rerun
skips it. Inside a stage, finished items (checkpoints, CAM files, masks) are skipped too, so
a killed stage resumes where it stopped.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Mapping

from pmm_jax import distributed, io
from pmm_jax.workdir import Workdir

if TYPE_CHECKING:  # ml_collections is not needed to import a stage (the benchmarks do)
    import ml_collections

log = logging.getLogger(__name__)

ORDER = ("cls", "cam", "pseudo", "seg", "cycle", "eval")

# The stage whose output each stage reads.
REQUIRES = {"cam": "cls", "pseudo": "cam", "seg": "pseudo", "cycle": "seg", "eval": "seg"}


class StageInputError(RuntimeError):
    """A stage's inputs are missing from the workdir."""


def parse_stages(spec: str) -> list[str]:
    """Parses ``"cls,cam"`` into stage names in pipeline order; unknown names are an error."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ORDER]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in --config.stages={spec!r}; "
                         f"known stages in order: {','.join(ORDER)}")
    if not names:
        raise ValueError("--config.stages is empty; choose from " + ",".join(ORDER))
    return sorted(set(names), key=ORDER.index)


def _runner(name: str) -> Callable[[ml_collections.ConfigDict, Workdir], dict]:
    """Imports a stage module lazily so that `--help` and errors stay fast."""
    return importlib.import_module(f"pmm_jax.stages.{name}").run


def check_inputs(name: str, wd: Workdir) -> None:
    """Raises StageInputError naming the stage to run first when ``name``'s input is missing."""
    needed = REQUIRES.get(name)
    if needed and not os.path.exists(wd.stage_marker(needed)):
        raise StageInputError(
            f"stage '{name}' needs the output of stage '{needed}', which has not completed in "
            f"{wd.root} (no {wd.stage_marker(needed)}); run it first, e.g. "
            f"--config.stages={needed},{name}")


def completed(wd: Workdir) -> Mapping[str, dict]:
    """Markers of every completed stage: ``{stage: {"seconds": .., "metrics": {..}}}``."""
    return {name: io.read_json(wd.stage_marker(name)) for name in ORDER
            if os.path.exists(wd.stage_marker(name))}


def run_stage(name: str, config: ml_collections.ConfigDict, wd: Workdir) -> dict:
    """Runs one stage unless its marker says it is done; returns its marker contents."""
    marker = wd.stage_marker(name)
    if os.path.exists(marker):
        log.info("stage %s: already complete (%s); skipping", name, marker)
        return io.read_json(marker)
    check_inputs(name, wd)
    log.info("stage %s: starting", name)
    start = time.time()
    metrics = _runner(name)(config, wd)
    record = {"seconds": round(time.time() - start, 2), "metrics": metrics}
    # The marker is written once every process has finished the stage, and no process starts
    # the next stage (whose input check reads the marker) before it exists.
    distributed.barrier(f"stage-{name}-done")
    if distributed.is_main():
        io.write_json(marker, record)
    distributed.barrier(f"stage-{name}-marked")
    log.info("stage %s: done in %.1f s%s", name, record["seconds"],
             "".join(f"; {k}={v:.6f}" for k, v in headline(metrics).items()))
    return record


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
