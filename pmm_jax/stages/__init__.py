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
from typing import Callable, Mapping

import ml_collections

from pmm_jax import distributed, io
from pmm_jax.workdir import Workdir

log = logging.getLogger(__name__)

ORDER = ("cls", "cam", "pseudo", "seg", "cycle", "eval")

# The stage whose output each stage reads.
REQUIRES = {"cam": "cls", "pseudo": "cam", "seg": "pseudo", "cycle": "seg", "eval": "seg"}


# The model config that each training stage initialises from ``<key>.model.init_from``.
TRAINS_FROM = {"cls": "cls", "seg": "seg", "cycle": "seg"}
MODEL_NAMES = {"cls": "classifier", "seg": "segmenter"}


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


def check_random_init(config: ml_collections.ConfigDict) -> None:
    """Refuses (ValueError) to train the classifier or the segmenter from random weights.

    A selected stage of ``TRAINS_FROM`` whose ``config.<cls|seg>.model.init_from`` is empty
    would train from random weights, which the paper never does and which is far from its
    results; that is allowed only with ``config.allow_random_init = True`` (the demo configs).
    The error names the keys and says how to get and convert ImageNet weights.
    """
    if config.get("allow_random_init", False):
        return
    keys = sorted({TRAINS_FROM[name] for name in parse_stages(config.stages)
                   if name in TRAINS_FROM and not config[TRAINS_FROM[name]].model.get("init_from")})
    if not keys:
        return
    steps = []
    for key in keys:
        arch = config[key].model.backbone.name
        structure = f" --structure=PATH/{arch}.json" if arch.startswith("scalenet") else ""
        steps.append(f"python -m pmm_jax.convert --arch={arch} --src=IMAGENET_WEIGHTS.pth"
                     f"{structure} --out=DIR, then --config.{key}.model.init_from=DIR")
    raise ValueError(
        f"{' and '.join(f'config.{k}.model.init_from' for k in keys)} "
        f"{'is' if len(keys) == 1 else 'are'} empty: the "
        f"{' and the '.join(MODEL_NAMES[k] for k in keys)} would train from random weights, "
        "which the paper never does. Get the ImageNet weights and convert them: "
        + "; ".join(steps) + ". See README.md, section 'ImageNet weights'. To train from "
        "random weights anyway, set --config.allow_random_init=True.")


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
