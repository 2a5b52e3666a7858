"""What a stage declares about itself, once, in its module (``STAGE = Stage(...)``): the
planner (``pmm_jax.stages.planner``) and the marker records (``pmm_jax.stages.record``)
read nothing else about it; :func:`declared` finds a stage's declaration by name."""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import ml_collections

    from pmm_jax.data.dataset import Dataset
    from pmm_jax.files.workdir import Workdir


def _nothing(*_) -> list:
    return []


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
      name: its name in ``--config.stages`` (``pmm_jax.files.workdir.STAGES`` orders them).
      run: ``run(config, wd, data) -> metrics`` (a dict of JSON values).
      requires: the stage whose outputs it cannot start without (None: the first).
      sections: the config key prefixes (``"crf"``, ``"eval.rule"``) whose values first
        affect this stage's results (a changed one makes it and every later stage stale).
      writes: ``writes(config, wd) -> {path: kind}``: its outputs, kind "files" (a folder
        of per-item files), "checkpoint" (an orbax folder) or "file".
      owns: ``owns(config, wd) -> [path]``: everything it writes (outputs, TensorBoard
        logs): what ``--redo`` deletes.
      reads: ``reads(config) -> [stage]``: the other completed stages whose outputs this
        config makes it read (besides ``requires``).
      final_step: ``final_step(config)``: the step its checkpoints must reach (stages that
        write checkpoints).
    """

    name: str
    run: Callable[[ml_collections.ConfigDict, Workdir, Dataset], dict]
    requires: str | None
    sections: tuple[str, ...]
    writes: Callable[[ml_collections.ConfigDict, Workdir], dict[str, str]]
    owns: Callable[[ml_collections.ConfigDict, Workdir], list[str]]
    reads: Callable[[ml_collections.ConfigDict], list[str]] = _nothing
    final_step: Callable[[ml_collections.ConfigDict], int] | None = None

    def needs(self, config) -> list[str]:
        """Every stage whose outputs it reads: ``requires`` and ``reads(config)``."""
        return [*([self.requires] if self.requires else []), *self.reads(config)]


def declared(name: str) -> Stage:
    """The declaration of stage ``name``: ``STAGE`` of module ``pmm_jax.stages.<name>``
    (imported on first use, so that ``--help`` and config errors stay fast)."""
    return importlib.import_module(f"pmm_jax.stages.{name}").STAGE
