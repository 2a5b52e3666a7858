"""Two JAX processes on localhost run one pipeline into one shared workdir (SLOW: ~3-4 min).

This is the multi-host path of a TPU pod slice or a SLURM job, proven on one machine: two
processes (coordinator 127.0.0.1, 2 virtual CPU devices each, gloo collectives) run the tiny
``cls,cam,pseudo,seg`` pipeline with few steps. Checked: both exit 0; they report the same
mIoUs (each computes them from the shared files); every CAM and pseudo-mask is computed by
exactly one process; one checkpoint per model; markers and config written once.

Deselect with ``-m "not multiprocess"`` for a quick run.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from pmm_jax import io
from pmm_jax.workdir import Workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, SUBSET = 64, 32, 16  # synthetic_wsss/tiny and its eval subset

OVERRIDES = ("--config.stages=cls,cam,pseudo,seg", "--config.cls.num_steps=2",
             "--config.seg.num_steps=2", "--config.seg.runs=('pus',)",
             "--config.pseudo.variants=('baseline','ppmg')", "--config.pseudo.num_workers=1")

pytestmark = pytest.mark.multiprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Runs the two processes; returns ``(workdir, [completed process 0, process 1])``."""
    workdir = tmp_path_factory.mktemp("multiprocess")
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = free_port()
    logs = [open(workdir / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
         f"--workdir={workdir}", *OVERRIDES, f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        for i, log in enumerate(logs)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return workdir, codes, outputs


def test_both_processes_succeed(two_process_run):
    _, codes, outputs = two_process_run
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    wd = Workdir(str(two_process_run[0]))
    for stage in ("cls", "cam", "pseudo", "seg"):
        assert os.path.exists(wd.stage_marker(stage))
    assert io.read_json(wd.config_json)["stages"] == "cls,cam,pseudo,seg"


def test_processes_report_the_same_mious(two_process_run):
    """Each process logs the mIoUs it computed itself: they must be identical."""
    _, codes, outputs = two_process_run
    assert codes == [0, 0]
    pattern = re.compile(r"stage (\w+): done in [\d.]+ s(;.*)?$", re.M)
    reports = [{m.group(1): m.group(2) for m in pattern.finditer(out)} for out in outputs]
    assert set(reports[0]) == {"cls", "cam", "pseudo", "seg"}
    assert reports[0] == reports[1]
    assert "cam_miou=" in reports[0]["cam"] and "pseudo_mask_miou.ppmg=" in reports[0]["pseudo"]


def test_every_mask_and_cam_is_computed_once(two_process_run):
    workdir, codes, _ = two_process_run
    assert codes == [0, 0]
    wd = Workdir(str(workdir))
    generation = io.read_json(wd.stage_marker("pseudo"))["metrics"]["generation"]
    for method, images in (("ppmg", NUM_TRAIN), ("baseline", SUBSET)):
        per_process = generation[method]["per_process"]
        assert sum(per_process["written"]) == images, per_process
        assert min(per_process["written"]) > 0 and sum(per_process["skipped"]) == 0
        assert len(os.listdir(wd.pseudo_masks(method))) == images
    written = io.read_json(wd.stage_marker("cam"))["metrics"]["written_per_process"]
    assert [sum(written["train"]), sum(written["val"])] == [NUM_TRAIN, NUM_VAL]
    assert min(written["train"]) > 0


def test_one_shared_checkpoint_per_model(two_process_run):
    workdir, codes, _ = two_process_run
    assert codes == [0, 0]
    from pmm_jax import trainer
    wd = Workdir(str(workdir))
    assert trainer.latest_step(wd.ckpt_dir("cls")) == 2
    assert trainer.latest_step(wd.ckpt_dir("seg/pus")) == 2
    assert sorted(os.listdir(os.path.join(workdir, "seg"))) == ["pus"]
