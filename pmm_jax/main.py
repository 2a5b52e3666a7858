r"""Runs the PMM pipeline: ``python -m pmm_jax.main --config=configs/demo.py --workdir=DIR``.

Stages (``--config.stages=cls,cam,pseudo,seg,cycle,eval``) run in order; each reads its
inputs from the workdir and skips work already done, so rerunning the same command after a
kill resumes. Overrides use ml_collections syntax (``--config.seg.num_steps=100``); the config
is locked, so a misspelt key is an error.

Several processes (hosts) run the same command on one shared workdir. On a Cloud TPU VM and
under SLURM/Open MPI they find each other by themselves; elsewhere pass
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (``pmm_jax.distributed``).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a get_config() file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs of the run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (with "
    "--num_processes and --process_id); unset = detect a TPU pod/SLURM/MPI job, else one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(path: str) -> None:
    """Creates the workdir and proves it is writable, or raises a clear error."""
    try:
        os.makedirs(path, exist_ok=True)
        # One probe per process: several processes may check a shared workdir at once.
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise app.UsageError(f"--workdir={path} is not writable: {err}") from err


def check_config(config) -> None:
    """Checks the choices that would otherwise fail only deep inside a stage: the stage list
    and the dense CRF backend ``config.crf.backend``. Raises ValueError naming the key."""
    from pmm_jax import crf, stages

    stages.parse_stages(config.stages)
    crf.config_backend(config)


def run(config, workdir: str) -> dict:
    """Runs the configured stages in ``workdir``; returns ``{stage: marker}`` of those run."""
    import jax

    from pmm_jax import distributed, io, stages
    from pmm_jax.workdir import Workdir

    names = stages.parse_stages(config.stages)
    check_workdir(workdir)
    wd = Workdir(workdir)
    if distributed.is_main():
        io.write_json(wd.config_json, config.to_dict())
    if jax.process_count() > 1:
        # tfds builds the synthetic dataset on first use: one process builds, the others wait.
        from pmm_jax.stages import common
        if distributed.is_main():
            common.data_dir(config, wd)
        distributed.barrier("dataset-ready")
    return {name: stages.run_stage(name, config, wd) for name in names}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pmm_jax import distributed, stages
    from pmm_jax.data.synthetic import DatasetNotPreparedError
    # Library chatter (orbax's read-only notices, tfds) only on errors; this package's
    # progress messages at INFO.
    logging.set_verbosity(logging.ERROR)
    std_logging.getLogger("pmm_jax").setLevel(std_logging.INFO)
    try:
        check_config(_CONFIG.value)
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except stages.StageInputError as err:
        raise app.UsageError(str(err)) from err
    except DatasetNotPreparedError as err:
        sys.exit(f"error: {err}")  # the message says what to run; a traceback would bury it


if __name__ == "__main__":
    app.run(main)
