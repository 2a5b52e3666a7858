"""The segmenter runs of a config, named once: ``config.seg.runs`` (trained by stage ``seg``)
then ``cycle1..cycleN`` (``config.cycle.num_cycles``, trained by stage ``cycle``)."""

from __future__ import annotations


def seg_runs(config) -> list[str]:
    """The runs of stage ``seg``: ``config.seg.runs`` (each names its loss)."""
    return list(config.seg.runs)


def cycle_runs(config) -> list[str]:
    """The runs of stage ``cycle``: ``cycle1`` .. ``cycle<config.cycle.num_cycles>``."""
    return [f"cycle{i}" for i in range(1, config.cycle.num_cycles + 1)]


def all_runs(config) -> list[tuple[str, str]]:
    """``(run, the stage that trains it)`` of every segmenter run, in training order."""
    return [(run, "seg") for run in seg_runs(config)] + [(run, "cycle")
                                                          for run in cycle_runs(config)]


def trained_by(run: str) -> str:
    """The stage that trains segmenter ``run``: 'cycle' for cyclic runs, else 'seg'."""
    return "cycle" if run.startswith("cycle") else "seg"

