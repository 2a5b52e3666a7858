"""Stage bookkeeping the stages share: TensorBoard pictures, mask readers, warnings.

Data access is not here: stages read their dataset through ``pmm_jax.data.dataset.Dataset``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from pmm_jax import config_rules
from pmm_jax.files import safe_io
from pmm_jax.training import distributed

log = logging.getLogger(__name__)

# Images in the cam and pseudo stages' TensorBoard picture summaries.
NUM_SUMMARY_IMAGES = 4


def write_images(log_dir: str, images: dict[str, np.ndarray], step: int = 0) -> None:
    """Writes uint8 ``[H, W, 3]`` pictures to TensorBoard, one tag each, on process 0 only."""
    if not distributed.is_main() or not images:
        return
    from clu import metric_writers

    writer = metric_writers.SummaryWriter(log_dir)
    try:
        writer.write_images(step, {tag: picture[None] for tag, picture in images.items()})
    finally:
        writer.close()


def mask_reader(directory: str) -> Callable[[str], np.ndarray]:
    """``id -> mask`` reading ``directory/<id>.png``."""
    return lambda image_id: safe_io.read_mask(os.path.join(directory, f"{image_id}.png"))


def warn_random_init(config, model: str) -> None:
    """Warns, when ``config.allow_random_init`` is set (rehearsals), that ``config.<model>``
    trains without ImageNet weights (no ``model.init_from``, nor for the segmenter
    ``init_from_cls``): its figures are near chance."""
    if config.get("allow_random_init") and not config_rules.has_initial_weights(config[model]):
        log.warning("%s: no ImageNet weights loaded (config.%s.model.init_from is empty; "
                    "allow_random_init=True): training from random initialisation, so the "
                    "mIoUs of this run are not the paper's", model, model)
