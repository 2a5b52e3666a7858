"""Cheap concrete values for shape-only Flax NNX models (the CAM tests' large backbones)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def materialize(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
    """A shape-only (``nnx.eval_shape``) model with numpy-drawn values: He-normal kernels, BN
    scales near 1 and offsets near 0, non-trivial BN statistics, zero RNG keys. Much cheaper
    than initialising eagerly, which compiles one XLA program per parameter shape."""
    rng = np.random.default_rng(seed)

    def value(name, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0, impl="rbg")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        if name == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), x.shape), x.dtype)
        base = {"scale": 1.0, "var": 1.0, "mean": 0.0, "bias": 0.0}[name]
        return jnp.asarray(base + rng.uniform(0.1, 0.5, x.shape), x.dtype)

    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.from_flat_state([
        (path, var.replace(value(str(path[-1]), var.get_value())))
        for path, var in nnx.to_flat_state(state)]))
