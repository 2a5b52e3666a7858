"""pmm_jax.training.distributed in one process: environment detection, argument checks, no-op helpers.

The multi-process behaviour itself is tested by tests/test_multiprocess.py.
"""

import pytest

from pmm_jax.training import distributed

CLUSTER_VARS = ("PMM_DISTRIBUTED", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_laptop_is_no_cluster(clean_env):
    assert distributed.cluster_environment() is None
    assert distributed.initialize() is False  # nothing to join: a no-op


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: a single process
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}, "tpu"),
    ({"PMM_DISTRIBUTED": "1"}, "forced"),
    ({"PMM_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),
])
def test_cluster_environment(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert distributed.cluster_environment() == expected


def test_explicit_flags_come_together(clean_env):
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("127.0.0.1:1234", None, 0)


def test_helpers_are_local_with_one_process():
    distributed.barrier("nothing-to-wait-for")
    assert distributed.is_main()
    assert distributed.any_process(True) and not distributed.any_process(False)
    assert distributed.gather_ints({"written": 3, "skipped": 1}) == {"skipped": [1], "written": [3]}
