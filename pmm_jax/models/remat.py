"""Rematerialisation of backbone blocks (model config key ``remat``).

With ``remat=True`` a backbone runs each residual block under ``nnx.remat`` (flax NNX's
``jax.checkpoint``): the backward pass keeps only the blocks' inputs and recomputes
everything inside a block from them, instead of keeping every intermediate activation of
the forward pass. The result (loss, gradients, BatchNorm statistics, dropout masks) is the
same; the cost is about one more forward pass per training step, the gain a much smaller
activation memory (docs/models.md, "Memory", with its figures). Outside
differentiation (inference) it changes nothing.

On the CPU, XLA removes ``jax.checkpoint``'s optimisation barriers early in its pipeline
("cse_barrier_expander", right after CSE), and CSE then merges the recomputation back into the
forward pass: a CPU compile of a remat step is the plain step (same memory). The GPU pipeline
keeps the barriers until after scheduling. To see remat's effect in a CPU compile (tests,
``bench/step_memory.py``), compile with :data:`KEEP_BARRIERS`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

# ``jit(f).lower(...).compile(KEEP_BARRIERS)``: XLA keeps the remat barriers on the CPU too.
KEEP_BARRIERS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


@nnx.remat
def _checkpointed(block: nnx.Module, x: Any) -> Any:
    return block(x)


def call_block(block: nnx.Module, x: Any, remat: bool) -> Any:
    """``block(x)``, under ``nnx.remat`` when ``remat``: its activations are recomputed in the
    backward pass rather than stored."""
    return _checkpointed(block, x) if remat else block(x)
