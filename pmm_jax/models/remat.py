"""Rematerialisation of backbone blocks (model config key ``remat``).

With ``remat=True`` a backbone runs each residual block under ``nnx.remat`` (flax NNX's
``jax.checkpoint``): the backward pass keeps only the blocks' inputs and recomputes
everything inside a block from them, instead of keeping every intermediate activation of
the forward pass. The result (loss, gradients, BatchNorm statistics, dropout masks) is the
same; the cost is about one more forward pass per training step, the gain a much smaller
activation memory (docs/models.md, "Memory"; figures in docs/benchmarks.md). Outside
differentiation (inference) it changes nothing.
"""

from __future__ import annotations

from typing import Any

from flax import nnx


@nnx.remat
def _checkpointed(block: nnx.Module, x: Any) -> Any:
    return block(x)


def call_block(block: nnx.Module, x: Any, remat: bool) -> Any:
    """``block(x)``, under ``nnx.remat`` when ``remat``: its activations are recomputed in the
    backward pass rather than stored."""
    return _checkpointed(block, x) if remat else block(x)
