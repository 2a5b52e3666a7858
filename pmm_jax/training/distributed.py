"""Multi-process JAX: start-up from flags or the cluster environment, and cross-process helpers.

One process per host (TPU VM worker, GPU node) runs the same command; ``initialize`` joins
them into one JAX runtime before anything touches a device:

* explicit ``coordinator_address``, ``num_processes``, ``process_id`` (``pmm_jax.main`` flags
  of the same names; any machines that can reach each other, e.g. several GPU hosts);
* otherwise the environment: a SLURM step or Open MPI job with more than one task, or a Cloud
  TPU VM (single host or pod slice), where ``jax.distributed.initialize()`` finds the
  coordinator, process count and id by itself. ``PMM_DISTRIBUTED=0`` turns the detection off,
  ``PMM_DISTRIBUTED=1`` forces it (a cluster JAX can detect but this module does not know);
* otherwise nothing: a laptop or a single GPU host runs one process, and every helper below
  is then a no-op, so the single-process path has no collectives at all.

Work split across processes: training and prediction batches come from per-process dataset
shards (``pmm_jax.data.pipeline``); pseudo-masks are shared out image by image
(``pseudo_masks.generate``). Files one process writes and another reads are separated by
:func:`barrier`; process 0 alone writes markers, results and the config (:func:`is_main`).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)

_FORCE_ENV = "PMM_DISTRIBUTED"


def cluster_environment() -> str | None:
    """The multi-process environment this process runs in, or None.

    ``"slurm"``/``"ompi"`` when the job has more than one task, ``"tpu"`` on a Cloud TPU VM
    (also single-host: initialising there is harmless and makes pod slices work unchanged),
    ``"forced"`` when ``PMM_DISTRIBUTED=1``; ``PMM_DISTRIBUTED=0`` always gives None.
    """
    forced = os.environ.get(_FORCE_ENV)
    if forced == "0":
        return None
    if forced == "1":
        return "forced"
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (JAX's own check, run when libtpu is installed)."""
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to a multi-process JAX runtime when asked to; returns whether it did.

    Must run before any JAX computation. Explicit arguments must come all three together;
    without them the environment decides (:func:`cluster_environment`). CPU devices of
    different processes talk through gloo (the default from jax 0.5 on, set here so that
    older releases agree).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                         f"got {coordinator_address=}, {num_processes=}, {process_id=}")
    if coordinator_address is None:
        source = cluster_environment()
        if source is None:
            return False
    else:
        source = "flags"
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX without the option (gloo then needs no opt-in)
        pass
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("distributed (%s): process %d of %d, %d local / %d global devices", source,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def is_main() -> bool:
    """True on the process that writes shared files (markers, results, config): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``barrier(name)``; a no-op with one process.

    Every process must call it with the same names in the same order.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on at least one process (a collective with several).

    Used where processes must agree on whether to run a sharded computation: a process with
    nothing left to do still has to join the collective its peers start.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def gather_ints(values: dict[str, int]) -> dict[str, list[int]]:
    """``{key: [value on process 0, value on process 1, ...]}`` (a collective with several)."""
    keys = sorted(values)
    local = np.asarray([int(values[k]) for k in keys], np.int64)
    if jax.process_count() == 1:
        rows = local[None]
    else:
        from jax.experimental import multihost_utils
        rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys))
    return {k: [int(v) for v in rows[:, i]] for i, k in enumerate(keys)}
