"""Two JAX processes on localhost run one pipeline into one shared workdir (SLOW: ~2-4 min).

This is the multi-host path of a TPU pod slice or a SLURM job, proven on one machine: two
processes (coordinator 127.0.0.1, 2 virtual CPU devices each, gloo collectives) run the tiny
``cls,cam,pseudo,seg`` pipeline with few steps. Both processes are SIGKILLed in the middle of
the ``pseudo`` stage (as a preempted pod slice would be) and the same two commands are run
again. Checked: both exit 0; the resumed run skips the completed stages and the masks already
written; they report the same mIoUs (each computes them from the shared files); every CAM and
pseudo-mask is computed by exactly one process, once; one checkpoint per model; markers and
config written once.

Deselect with ``-m "not multiprocess"`` for a quick run.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, SUBSET = 64, 32, 16  # synthetic_wsss/tiny and its eval subset

OVERRIDES = ("--config.stages=cls,cam,pseudo,seg", "--config.cls.num_steps=2",
             "--config.seg.num_steps=2", "--config.seg.runs=('pus',)",
             "--config.pseudo.variants=('baseline','ppmg')", "--config.pseudo.num_workers=1")

# One worker runs the module, so the two-process run (its module fixture) happens once.
pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(workdir, tag: str):
    """Starts the two processes of one run (a fresh coordinator port); returns them and logs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    # Without the suite's compilation cache: a process that finds a program cached would reach
    # the collective that follows tens of seconds before its peer has compiled it, past gloo's
    # 30 s rendezvous deadline.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    port = free_port()
    logs = [open(workdir / f"{tag}-process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
         f"--workdir={workdir}", *OVERRIDES, f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        for i, log in enumerate(logs)]
    return procs, logs


def read_logs(logs) -> list[str]:
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return outputs


def finished_masks(directory) -> list[str]:
    """Mask files under their final name (a killed write leaves only a ``.tmp-`` file)."""
    if not os.path.isdir(directory):
        return []
    return [n for n in os.listdir(directory) if not n.startswith(".tmp-")]


def kill_during_pseudo(workdir, min_masks: int = 8, timeout: float = 600) -> tuple[int, list[str]]:
    """Runs both processes until ``min_masks`` PPMG masks exist, then SIGKILLs both.

    Returns the number of finished masks left behind and the two logs.
    """
    masks = Workdir(str(workdir)).pseudo_masks("ppmg")
    procs, logs = start_processes(workdir, "killed")
    deadline = time.time() + timeout
    try:
        while len(finished_masks(masks)) < min_masks:
            assert all(p.poll() is None for p in procs), read_logs(logs)
            assert time.time() < deadline, "no pseudo-masks before the deadline"
            time.sleep(0.02)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return len(finished_masks(masks)), read_logs(logs)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Kills the two processes during ``pseudo``, then reruns them to completion.

    Returns ``(workdir, [exit codes], [log of process 0, process 1], masks left by the kill)``.
    """
    workdir = tmp_path_factory.mktemp("multiprocess")
    left, _ = kill_during_pseudo(workdir)
    procs, logs = start_processes(workdir, "resumed")
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return workdir, codes, read_logs(logs), left


def test_both_processes_succeed(two_process_run):
    _, codes, outputs, _ = two_process_run
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    wd = Workdir(str(two_process_run[0]))
    for stage in ("cls", "cam", "pseudo", "seg"):
        assert os.path.exists(wd.stage_marker(stage))
    assert safe_io.read_json(wd.config_json)["stages"] == "cls,cam,pseudo,seg"


def test_resumed_run_skips_completed_stages(two_process_run):
    """cls and cam finished before the kill: the rerun skips them on both processes."""
    _, codes, outputs, left = two_process_run
    assert codes == [0, 0]
    assert 8 <= left < NUM_TRAIN, "the kill must land inside the pseudo stage"
    for out in outputs:
        for stage in ("cls", "cam"):
            assert re.search(rf"stage {stage}: already complete", out), out[-3000:]
        assert "stage pseudo: starting" in out


def test_processes_report_the_same_mious(two_process_run):
    """Each process logs the mIoUs it computed itself: they must be identical."""
    _, codes, outputs, _ = two_process_run
    assert codes == [0, 0]
    pattern = re.compile(r"stage (\w+): done in [\d.]+ s(;.*)?$", re.M)
    reports = [{m.group(1): m.group(2) for m in pattern.finditer(out)} for out in outputs]
    assert set(reports[0]) == {"pseudo", "seg"}
    assert reports[0] == reports[1]
    assert "pseudo_mask_miou.ppmg=" in reports[0]["pseudo"]


def test_every_mask_and_cam_is_computed_once(two_process_run):
    """Across the kill and the rerun, each PPMG mask is written by exactly one process once:
    the rerun skips exactly the masks the killed run finished and writes the rest."""
    workdir, codes, _, left = two_process_run
    assert codes == [0, 0]
    wd = Workdir(str(workdir))
    generation = safe_io.read_json(wd.stage_marker("pseudo"))["metrics"]["generation"]
    ppmg = generation["ppmg"]["per_process"]
    assert sum(ppmg["skipped"]) == left and sum(ppmg["written"]) == NUM_TRAIN - left, ppmg
    assert min(ppmg["written"]) > 0
    baseline = generation["baseline"]["per_process"]  # made after the kill: no skips
    assert sum(baseline["written"]) == SUBSET and sum(baseline["skipped"]) == 0, baseline
    assert min(baseline["written"]) > 0
    for method, images in (("ppmg", NUM_TRAIN), ("baseline", SUBSET)):
        assert len(finished_masks(wd.pseudo_masks(method))) == images
    written = safe_io.read_json(wd.stage_marker("cam"))["metrics"]["written_per_process"]
    assert [sum(written["train"]), sum(written["val"])] == [NUM_TRAIN, NUM_VAL]
    assert min(written["train"]) > 0


def test_one_shared_checkpoint_per_model(two_process_run):
    workdir, codes, _, _ = two_process_run
    assert codes == [0, 0]
    from pmm_jax.training import checkpoints
    wd = Workdir(str(workdir))
    assert checkpoints.latest_step(wd.ckpt_dir("cls")) == 2
    assert checkpoints.latest_step(wd.ckpt_dir("seg/pus")) == 2
    assert sorted(os.listdir(os.path.join(workdir, "seg"))) == ["pus"]
