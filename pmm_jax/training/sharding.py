"""Device mesh, shardings, and host batch -> global sharded arrays.

Data parallelism only: one mesh axis ``"data"`` spans every device of every process. Model and
optimizer state are replicated; batches are split along their leading (batch) axis. Each process
feeds only its own per-process batch (``config.<stage>.batch_size / jax.process_count()`` rows);
``shard_batch`` stitches the per-process batches into one global array, so the same code runs on
one CPU, one GPU host, or many hosts.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh named ``"data"`` over all (global) devices, in ``jax.devices()`` order."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading axis of an array over the ``"data"`` axis (batch parallelism)."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_local_batch_size(local_batch_size: int, config_key: str) -> None:
    """Raises ValueError unless the per-process batch splits evenly over the local devices.

    ``config_key`` names the setting the user has to change (e.g. ``"config.cls.batch_size"``),
    which holds the *global* batch size = per-process batch size x ``jax.process_count()``.
    """
    devices = jax.local_device_count()
    if local_batch_size % devices:
        need = devices * jax.process_count()
        raise ValueError(
            f"per-process batch size {local_batch_size} is not divisible by the {devices} local "
            f"devices; set {config_key} (the global batch size) to a multiple of {need} "
            f"({devices} local devices x {jax.process_count()} processes)")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *,
                config_key: str = "batch_size") -> dict[str, jax.Array]:
    """Turns this process's batch (dict of numpy, leading batch axis) into global jax.Arrays.

    Every process calls this with its own local rows; the result is sharded over ``"data"`` with
    the processes' rows concatenated in process order. Only numeric and boolean arrays are
    device data: string/bytes entries such as ``id`` are dropped here and stay host-side in the
    caller's dict (they cannot live on an accelerator and are only needed for file names).
    ``config_key`` is quoted in the error when the batch does not split over the local devices.
    """
    arrays = {k: v for k, v in batch.items() if _is_device_data(v)}
    sizes = {v.shape[0] for v in arrays.values()}
    if len(sizes) > 1:
        raise ValueError(f"batch entries disagree on the batch size: "
                         f"{ {k: v.shape for k, v in arrays.items()} }")
    for size in sizes:
        check_local_batch_size(size, config_key)
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in arrays.items()}


def _is_device_data(value: Any) -> bool:
    """True for arrays with at least a batch axis and a numeric or boolean dtype."""
    array = np.asarray(value)
    return array.ndim >= 1 and (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)


def replicate(state: Any, mesh: Mesh) -> Any:
    """Puts every array of ``state`` on all devices (a no-op for already replicated arrays).

    With several processes ``device_put`` cannot target other hosts' devices: each process
    contributes its own (identical) copy through ``make_array_from_process_local_data``.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(state, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(put, state)
