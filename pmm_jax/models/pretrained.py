"""Pretrained backbone checkpoints: write one (``pmm_jax.convert``) and load it into a model.

A pretrained checkpoint is a directory holding an orbax checkpoint of one flat dict
``{"<dotted path>": array}`` with every ``nnx.Param`` and ``nnx.BatchStat`` of a backbone
(paths as ``nnx`` prints them, joined by "."), plus ``pretrained.json`` with the
architecture name and where the weights came from. Configs load it with one key,
``config.cls.model.init_from=DIR``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

META_FILE = "pretrained.json"
ARRAYS_DIR = "arrays"
WEIGHTS = (nnx.Param, nnx.BatchStat)


def flat_weights(module: nnx.Module) -> dict[str, nnx.Variable]:
    """``{dotted path: Variable}`` of the module's parameters and BN statistics."""
    state = nnx.state(module, WEIGHTS)
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def save_pretrained(arrays: Mapping[str, np.ndarray], directory: str, meta: Mapping[str, Any]
                    ) -> None:
    """Writes ``arrays`` (dotted path -> array) and ``meta`` as a pretrained checkpoint."""
    path = epath.Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / ARRAYS_DIR, {k: np.asarray(v) for k, v in arrays.items()}, force=True)
    (path / META_FILE).write_text(json.dumps(dict(meta), indent=1, sort_keys=True))


def read_meta(directory: str) -> dict:
    """The ``pretrained.json`` of a checkpoint directory; FileNotFoundError when absent."""
    meta = os.path.join(directory, META_FILE)
    if not os.path.exists(meta):
        raise FileNotFoundError(f"{directory} is not a pretrained checkpoint (no {META_FILE}); "
                                "make one with `python -m pmm_jax.convert`")
    with open(meta) as f:
        return json.load(f)


def load_pretrained(module: nnx.Module, directory: str, *, arch: str | None = None
                    ) -> nnx.Module:
    """Loads a pretrained checkpoint into ``module`` (in place) and returns it.

    Every parameter and BN statistic of ``module`` must be in the checkpoint with the same
    shape; ``arch`` (e.g. the config's backbone name), when given, must equal the
    checkpoint's. Otherwise ValueError listing what differs (missing, unexpected and
    mis-shaped entries), so a checkpoint of another network or width is never half-loaded.
    """
    meta = read_meta(directory)
    if arch is not None and meta.get("arch") != arch:
        raise ValueError(f"{directory} holds a {meta.get('arch')!r} checkpoint, but the model's "
                         f"backbone is {arch!r}")
    target = flat_weights(module)
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(epath.Path(directory).absolute() / ARRAYS_DIR)
    check_same_layout({k: v.shape for k, v in target.items()},
                      {k: np.shape(v) for k, v in arrays.items()}, what=directory)
    for key, var in target.items():
        var.set_value(jnp.asarray(arrays[key], var.dtype))
    return module


def copy_weights(source: nnx.Module, target: nnx.Module, *, what: str, hint: str = ""
                 ) -> nnx.Module:
    """Copies every parameter and BN statistic of ``source`` into ``target`` (in place).

    For a backbone trained in one model that starts another (the ``cls`` stage's classifier
    backbone into the segmenter's). Both must have the same entries with the same shapes;
    otherwise ValueError (``check_same_layout``, naming ``what`` and ``hint``) and nothing is
    copied.
    """
    src, dst = flat_weights(source), flat_weights(target)
    check_same_layout({k: v.shape for k, v in dst.items()}, {k: v.shape for k, v in src.items()},
                      what=what, hint=hint)
    for key, var in dst.items():
        var.set_value(jnp.asarray(src[key].get_value(), var.dtype))
    return target


def check_same_layout(expected: Mapping[str, tuple], found: Mapping[str, tuple], *, what: str,
                      hint: str = "", allow_unexpected: bool = False) -> None:
    """ValueError listing missing keys, unexpected keys and shape mismatches, if any.

    With ``allow_unexpected``, extra keys alone are accepted (a classifier head in an
    ImageNet checkpoint) but are still listed when something else is wrong.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(f"{k}: model {tuple(expected[k])} vs {tuple(found[k])}"
                        for k in set(expected) & set(found)
                        if tuple(expected[k]) != tuple(found[k]))
    if missing or mismatched or (unexpected and not allow_unexpected):
        lines = [f"{what} does not fit the model{': ' + hint if hint else ''}"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                shown = "\n    ".join(items[:20])
                more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}):\n    {shown}{more}")
        raise ValueError("\n".join(lines))


def count_params(module: nnx.Module) -> int:
    """Number of trainable-kind parameters (``nnx.Param``), as torch's ``parameters()`` counts."""
    return sum(int(np.prod(v.shape)) for _, v in
               nnx.to_flat_state(nnx.state(module, nnx.Param)))

