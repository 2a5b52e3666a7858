"""Where every stage's inputs and outputs live inside a run's workdir.

All paths are derived here so that stages, notebooks and tests agree on one layout
(documented in docs/design.md).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of one run's outputs under ``root``."""

    root: str

    def data_dir(self, configured: str = "") -> str:
        """The tensorflow-datasets data_dir: the configured one (``~`` expanded, as in the
        documented ``--config.data.data_dir=~/tfds``), else ``root/tfds``."""
        return os.path.expanduser(configured) if configured else os.path.join(self.root, "tfds")

    @property
    def config_json(self) -> str:
        return os.path.join(self.root, "config.json")

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

    def predictions(self, run: str, split: str) -> str:
        return os.path.join(self.root, "predictions", run, split)
