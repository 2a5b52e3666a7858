"""Checkpoints (``training/checkpoints.py``): inference restores exactly the step it is given
or stops naming it; damaged steps are detected by their digest, set aside and redone by
training; a failed write is one message naming the resume step. On the TinyNet runs of
``tests/training/test_trainer.py``."""

import pathlib

import pytest
from flax import nnx

from pmm_jax.training import checkpoints
from tests.support.tiny_training import TinyNet, assert_trees_close, batches_from, params_of, run


class Finished:
    """A finished 10-step TinyNet run: its final state (numpy) and its folder."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.final = params_of(run(path, 10))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Finished:
    return Finished(tmp_path_factory.mktemp("full"))


def test_restore_model(uninterrupted):
    final, path = uninterrupted.final, uninterrupted.path
    model = checkpoints.restore_model(TinyNet(nnx.Rngs(1)), str(path / "ckpt"), step=10,
                                      hint="run stage cls first")
    assert_trees_close(params_of(model), final)
    assert model.bn.use_running_average


def test_restore_model_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint in {tmp_path}: run stage cls"):
        checkpoints.restore_model(TinyNet(nnx.Rngs(0)), str(tmp_path), step=1,
                                  hint="run stage cls first")


def copy_checkpoints(uninterrupted, tmp_path) -> pathlib.Path:
    """A copy of the 10-step run's checkpoints (steps 9 and 10, each with its digest)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted.path / "ckpt", ckpt)
    assert (ckpt / "10" / checkpoints.DIGEST_FILE).exists()
    return ckpt


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_bytes_stop_inference_and_training_redoes_the_step(tmp_path, uninterrupted):
    """64 flipped bytes in step 10's model data: loading the final step 10 stops, naming it
    and the newest intact step 9 (never step 9's model in its place); training sets step 10
    aside, redoes it from step 9 and ends where the uninterrupted run did."""
    ckpt = copy_checkpoints(uninterrupted, tmp_path)
    data = largest_file(ckpt / "10" / "model")
    raw = bytearray(data.read_bytes())
    raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])
    data.write_bytes(bytes(raw))
    assert checkpoints.latest_step(str(ckpt)) == 9
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"step 10 in .*is damaged \(.*sha256 mismatch\)\); the newest "
                             r"intact step is 9, but an older model is never used in its place: "
                             r"run stage cls again"):
        checkpoints.restore_model(TinyNet(nnx.Rngs(1)), str(ckpt), step=10,
                                  hint="run stage cls again")
    resumed = params_of(run(tmp_path, 10, batches=batches_from(9)))
    assert_trees_close(resumed, uninterrupted.final)
    assert checkpoints.latest_step(str(ckpt)) == 10 and list((tmp_path / "ckpt.damaged").iterdir())
    restored = checkpoints.restore_model(TinyNet(nnx.Rngs(1)), str(ckpt), step=10, hint="")
    assert_trees_close(params_of(restored), uninterrupted.final)


def test_truncated_file_or_missing_item_and_none_intact_is_an_error(
        tmp_path, uninterrupted):
    import shutil

    ckpt = copy_checkpoints(uninterrupted, tmp_path)
    data = largest_file(ckpt / "10" / "opt")
    data.write_bytes(data.read_bytes()[:10])
    assert checkpoints.latest_step(str(ckpt)) == 9
    shutil.rmtree(ckpt / "9" / "model")
    assert checkpoints.latest_step(str(ckpt)) is None
    with pytest.raises(checkpoints.CheckpointError, match=r"step 10: opt/.* has 10 bytes.*"
                                                          r"step 9: item model/ is missing"):
        run(tmp_path, 10, batches=batches_from(0))
    with pytest.raises(checkpoints.CheckpointError, match=r"step 9 in .* is damaged \(item "
                                                          r"model/ is missing\); no step is "
                                                          r"intact"):
        checkpoints.restore_model(TinyNet(nnx.Rngs(1)), str(ckpt), step=9, hint="")


def test_a_failed_checkpoint_write_is_one_message_naming_the_step_and_the_resume_point(
        tmp_path, monkeypatch):
    """A full disk while orbax writes step 6: CheckpointError (main prints it as one
    paragraph) naming the step, the cause and the step a rerun resumes from; no traceback
    chain of orbax's internals."""
    import errno

    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "6"))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"could not write checkpoint step 6 in .*ckpt \(OSError: \[Errno 28\] "
                             r"No space left on device.*Free disk space .* training resumes "
                             r"from step 3\."):
        run(tmp_path, 10)
    monkeypatch.undo()
    assert checkpoints.latest_step(str(tmp_path / "ckpt")) == 3


DISK_FULL_SCRIPT = """
import errno, pathlib, sys
from orbax.checkpoint._src.path import async_path
from tests.support.tiny_training import run
from pmm_jax.command_line import fail
from pmm_jax.training import checkpoints

real = async_path.write_text

async def write_text(path, text, *args, **kwargs):
    if "/6.orbax-checkpoint-tmp" in str(path):  # the disk fills while step 6 is written
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return await real(path, text, *args, **kwargs)

async_path.write_text = write_text
try:
    run(pathlib.Path(sys.argv[1]), 10)
except checkpoints.CheckpointError as err:
    fail(str(err))
"""


def test_a_disk_full_in_orbaxs_writer_threads_prints_only_the_closing_paragraph(tmp_path):
    """The writer threads of a failed save log errors with tracebacks (and tensorstore's
    print more); the run's stderr holds only the one paragraph saying what happened."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("train:", "WARNING:"))]  # progress, notes
    assert len(lines) == 1 and lines[0].startswith("error: could not write checkpoint step 6"), \
        proc.stderr[-3000:]
    assert "No space left on device" in lines[0] and "resumes from step 3" in lines[0]
