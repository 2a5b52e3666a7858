"""The run configs: each module's ``get_config(variant)`` returns an ``ml_collections.ConfigDict``.

The command lines load a config file by path (``--config=configs/voc.py[:variant]``, through
``ml_collections.config_flags``); code run from the repository root (``bench/``, ``tests/``)
imports the same modules (``from configs import voc; voc.get_config("rehearsal")``) instead
of copying their values. The package is not installed with pmm_jax: a config file is the
user's to copy and edit.
"""

import importlib


def get_config(name: str, variant: str | None = None):
    """``configs/<name>.py``'s ``get_config(variant)``, a fresh unlocked ConfigDict per call.

    Args:
        name: the config file's name without ``.py`` ("voc", "coco", "demo", "folder").
        variant: the variant after the colon of ``--config=configs/<name>.py:<variant>``;
            None for the file's default.
    """
    module = importlib.import_module(f"{__name__}.{name}")
    return module.get_config() if variant is None else module.get_config(variant)
