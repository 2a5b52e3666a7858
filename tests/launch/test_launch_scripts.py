"""The launch scripts pass shellcheck and print their usage (skipped without shellcheck)."""

import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = ("tpu_vm.sh", "multi_gpu.sh", "slurm.sbatch")


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck_passes(name):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "--shell=bash", str(LAUNCH / name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_tpu_script_without_a_step_prints_its_usage():
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TPU_NAME": "t", "PROJECT": "p"})
    assert proc.returncode == 2
    assert "launch/tpu_vm.sh run [flags...]" in proc.stdout and "TPU_NAME" in proc.stdout


def test_tpu_script_requires_tpu_name():
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "create"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "set TPU_NAME" in proc.stderr
