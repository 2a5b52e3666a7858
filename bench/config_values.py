"""The run configs (``configs/``) as the benchmarks read them, also where ml_collections is absent.

The benchmarks take their settings from ``configs/<name>.py`` rather than copies of its
numbers. A GPU image that has only jax, flax, optax, orbax, numpy and torch lacks
ml_collections, which the config files build their ``ConfigDict`` with: there the config is
built with :class:`AttrDict` standing in for ``ml_collections.ConfigDict`` (the same values,
attribute access, plain dicts underneath). Run from the repository root (``python -m
bench.suite``), where ``configs`` is importable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AttrDict(dict):
    """A dict with attribute access whose nested dicts are AttrDicts too: what the benchmarks
    and the library functions they call read of a config."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, dict) and not isinstance(value, AttrDict):
                self[key] = AttrDict(value)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    __setattr__ = dict.__setitem__

    def to_dict(self) -> dict:
        """Plain nested dicts (as ``ConfigDict.to_dict``)."""
        return {k: v.to_dict() if isinstance(v, AttrDict) else v for k, v in self.items()}


def get_config(name: str, variant: str | None = None):
    """``configs/<name>.py``'s ``get_config(variant)`` (``variant=None``: the file's default).

    Returns:
        An ``ml_collections.ConfigDict`` where ml_collections is installed, else the same
        values as an :class:`AttrDict`.
    """
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        with _stand_in_ml_collections():
            path = os.path.join(REPO, "configs", f"{name}.py")
            spec = importlib.util.spec_from_file_location(f"bench_config_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.get_config() if variant is None else module.get_config(variant)
    return importlib.import_module("configs").get_config(name, variant)


@contextlib.contextmanager
def _stand_in_ml_collections():
    """An ``ml_collections`` whose ``ConfigDict`` is :class:`AttrDict` in ``sys.modules`` for
    the duration (config files import it, some also when their ``get_config`` runs)."""
    stand_in = types.ModuleType("ml_collections")
    stand_in.ConfigDict = AttrDict
    missing = object()
    saved = sys.modules.get("ml_collections", missing)
    sys.modules["ml_collections"] = stand_in
    try:
        yield
    finally:
        if saved is missing:
            del sys.modules["ml_collections"]
        else:
            sys.modules["ml_collections"] = saved
