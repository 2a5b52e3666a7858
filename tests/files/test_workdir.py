"""The workdir's lock: one run at a time, the holder named, released when its process dies."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from pmm_jax.files import workdir
from pmm_jax.files.workdir import Workdir

ROOT = pathlib.Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from pmm_jax.files import workdir
with workdir.lock(workdir.Workdir(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


@pytest.fixture
def other_run(tmp_path):
    """A second process holding ``tmp_path``'s lock until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_process_is_refused_naming_the_holder(tmp_path, other_run):
    wd = Workdir(str(tmp_path))
    with pytest.raises(workdir.WorkdirBusyError,
                       match=rf"in use by another run \(host {socket.gethostname()} pid "
                             rf"{other_run.pid},.*another --workdir"):
        with workdir.lock(wd):
            pass
    other_run.kill()  # a killed holder leaves no lock behind
    other_run.wait()
    with workdir.lock(wd):
        assert workdir.holder(wd) == f"host {socket.gethostname()} pid {os.getpid()}"


def test_main_refuses_a_workdir_in_use(tmp_path, other_run):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
                           f"--workdir={tmp_path}", "--config.stages=cls"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"pid {other_run.pid}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "config.json").exists(), "a refused run writes nothing"
