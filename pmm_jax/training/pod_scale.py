"""A config's recipe on a slice with more chips than its batches: every global batch raised to
a multiple of the chip count, the training stages' learning rate scaled linearly with their
batch and their steps inversely (same epochs). docs/pod_scale.md argues the rule.

``configs/voc.py:pod64`` (``get_config("pod64")``) is the paper's VOC recipe for 64 chips
(e.g. a v5e:8x8 slice): batch 16 -> 64 (one image per chip), cls lr 0.02 -> 0.08 and 13227 ->
3307 steps, seg lr 0.005 -> 0.02 (min_lr 1e-4 -> 4e-4) and 20000 -> 5000 steps; the inference
batches (``cam.batch_size``, ``cam.multicrop.tile_batch``, ``eval.batch_size``) become 64
too, which changes no result. A chip count that divides every batch changes nothing.
"""

from __future__ import annotations

import math

# Training stages whose lr/steps follow their batch; the other batch keys are inference only.
TRAINED = ("cls", "seg")
INFERENCE_BATCHES = (("cam", "batch_size"), ("cam.multicrop", "tile_batch"),
                     ("eval", "batch_size"))


def scaled_batch(batch: int, chips: int) -> int:
    """The smallest multiple of ``chips`` that is at least ``batch``."""
    return math.ceil(batch / chips) * chips


def _section(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def scale_to_chips(config, chips: int):
    """``config`` (an unlocked ConfigDict) with every batch a multiple of ``chips`` (in place,
    returned). Training stage ``s`` with batch ``B -> B' = scaled_batch(B, chips)``:
    ``s.lr`` (and ``s.min_lr``) times ``B' / B``, ``s.num_steps`` divided by it (rounded up),
    so the images seen and the lr per image stay the paper's (the linear scaling rule)."""
    if chips < 1:
        raise ValueError(f"chips must be a positive integer, got {chips}")
    for stage in TRAINED:
        cfg = config[stage]
        new = scaled_batch(cfg.batch_size, chips)
        factor = new / cfg.batch_size
        if factor == 1:
            continue
        cfg.batch_size = new
        cfg.lr = cfg.lr * factor
        if "min_lr" in cfg:
            cfg.min_lr = cfg.min_lr * factor
        cfg.num_steps = math.ceil(cfg.num_steps / factor)
    for section, key in INFERENCE_BATCHES:
        cfg = _section(config, section)
        cfg[key] = scaled_batch(cfg[key], chips)
    return config


def pod_chips(variant: str) -> int | None:
    """``N`` of a ``"pod<N>"`` config variant, None for any other variant."""
    if variant.startswith("pod") and variant[3:].isdigit() and int(variant[3:]) > 0:
        return int(variant[3:])
    return None
