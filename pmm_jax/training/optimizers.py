"""Optimiser pieces every model's training shares: poly-decay SGD, parameter paths, and the
labelling of the backbone's frozen parameters (``backbone.frozen_prefixes``).

Parameters are named by their path in ``nnx.state(model, nnx.Param)`` as a tuple of strings
(:func:`path_names`); ``optax.multi_transform`` label trees are built from such
``{path: label}`` tables (:func:`label_tree`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import nnx

FROZEN = "frozen"


def sgd_poly(lr: float, num_steps: int, *, momentum: float = 0.9, weight_decay: float = 5e-4,
             power: float = 0.9, end_lr: float = 0.0, decay_1d: bool = False
             ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, L2 weight decay and poly learning-rate decay; returns (tx, schedule).

    ``lr(k) = (lr - end_lr) * (1 - k / num_steps) ** power + end_lr`` for update k = 0..num_steps
    (mmcv's ``PolyLrUpdaterHook`` with ``min_lr=end_lr``). Weight decay is added to the gradient
    before momentum (PyTorch ``SGD(weight_decay=...)``, as in the official PMM/mmseg code).
    ``decay_1d=True`` decays every parameter, as PyTorch's SGD over all of a model's parameters
    does (mmseg's segmenters); False decays only parameters with two or more dimensions (conv
    and dense kernels), leaving biases and BatchNorm scales/offsets (1-D) undecayed.
    """
    schedule = optax.polynomial_schedule(init_value=lr, end_value=end_lr, power=power,
                                         transition_steps=num_steps)
    decay_mask = None if decay_1d else (
        lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params))
    tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=momentum))
    return tx, schedule


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A parameter's pytree key path as strings (without nnx's trailing ``value``)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return tuple(names[:-1] if names and names[-1] == "value" else names)


def is_frozen(names: tuple[str, ...], prefixes: frozenset[str]) -> bool:
    """Whether parameter ``names`` lies under ``backbone.<prefix>`` for one of ``prefixes``."""
    return len(names) > 2 and names[0] == "backbone" and names[1] in prefixes


def frozen_param_labels(model: nnx.Module) -> dict[tuple[str, ...], bool]:
    """``{parameter path: frozen}``: True under one of ``model.backbone.frozen_prefixes`` (the
    backbone's ``frozen_stages``, mmseg's ``requires_grad=False`` parameters)."""
    prefixes = frozenset(model.backbone.frozen_prefixes)
    return {names: is_frozen(names, prefixes)
            for names in (path_names(path) for path, _ in
                          jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)))}


def label_tree(labels: Mapping[tuple[str, ...], str]) -> Callable[[Any], Any]:
    """The ``optax.multi_transform`` labelling function of a ``{path: label}`` table."""
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: labels[path_names(path)], params)


def freeze(tx: optax.GradientTransformation, model: nnx.Module) -> optax.GradientTransformation:
    """``tx`` for every parameter except the frozen ones (:func:`frozen_param_labels`), which
    get no update at all (no gradient step, momentum or weight decay: PyTorch's SGD skips
    ``requires_grad=False`` parameters). ``tx`` itself when none is frozen."""
    frozen = frozen_param_labels(model)
    if not any(frozen.values()):
        return tx
    labels = {path: FROZEN if is_frozen else "train" for path, is_frozen in frozen.items()}
    return optax.multi_transform({"train": tx, FROZEN: optax.set_to_zero()}, label_tree(labels))
