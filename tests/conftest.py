"""Test set-up shared by the whole suite.

Four virtual CPU devices make every jitted, sharded code path run exactly as it would on a
4-chip host; TensorFlow is kept off any GPU; compiled programs are cached on disk for the
session. All must happen before jax/tf are imported.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA compilation cache for the whole session, the pytest-xdist workers and
# every pipeline they start in a subprocess: the tiny pipeline is run, killed and resumed many
# times, and without the cache each process recompiles the same programs (about half of the
# suite's time). The key is the program, the compile options and the jax version, so a stale
# entry cannot be hit; the folder lives under the system temp dir and is never needed.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"pmm-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402
from tests.support.paths import ROOT, VOC_SAMPLES  # noqa: E402


# The modules whose tests run whole pipelines in subprocesses (minutes each), slowest first.
SLOW_MODULES = ("test_rehearsal.py", "test_multiprocess.py", "test_main.py",
                "test_folder_rehearsal.py", "test_multicrop_e2e.py", "test_precision.py",
                "test_plugins.py")


def pytest_collection_modifyitems(items):
    """Runs the slow modules first (stable otherwise): pytest-xdist hands out tests in this
    order, so the long ones start at once on both workers and the short ones fill the gaps,
    instead of one worker running a rehearsal alone at the end of the suite."""
    def rank(item):
        name = item.path.name
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)
    items.sort(key=rank)



@pytest.fixture(scope="session")
def voc_samples_dir():
    """The real VOC photographs beside the project; skips the test when they are absent."""
    if not VOC_SAMPLES.is_dir():
        pytest.skip(f"real VOC samples not found at {VOC_SAMPLES}")
    return VOC_SAMPLES


def run_main_until(workdir, stop_when=None, extra=(), timeout=900):
    """Runs the tiny demo pipeline in a subprocess; SIGKILLs it once ``stop_when()`` is true.

    Returns ``(returncode, killed, output)``. ``stop_when`` is polled every 20 ms, which makes
    it possible to kill the run in the middle of a stage, as a user pressing Ctrl-C or a
    preempted VM would.
    """
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "pmm_jax.main", "--config=configs/demo.py:tiny",
           f"--workdir={workdir}", *extra]
    log = pathlib.Path(workdir).with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        killed = False
        while proc.poll() is None:
            if stop_when is not None and stop_when():
                proc.kill()
                killed = True
                break
            if time.time() > deadline:
                proc.kill()
                raise TimeoutError(f"{cmd} ran past {timeout} s; see {log}")
            time.sleep(0.02)
        proc.wait()
    return proc.returncode, killed, log.read_text()


def session_temp(tmp_path_factory):
    """The temporary folder of this test session that every xdist worker shares (each worker's
    basetemp is a child of it); without xdist the session's own basetemp, whose parent holds
    earlier sessions' folders (reusing a finished run from those would test old code)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole tiny pipeline, killed during cls, pseudo and seg and resumed each time.

    Returns ``(workdir, log_text, kills)`` where ``kills`` names the stages the run was killed
    in. It runs once per test session: pytest-xdist workers share one run through a file lock
    in their common temporary directory, so tests that need a finished workdir (results,
    notebooks) never pay for a second run.
    """
    import fcntl
    import json

    shared = session_temp(tmp_path_factory)
    workdir = shared / "tiny_run" / "run"
    summary = shared / "tiny_run" / "summary.json"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(shared / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not summary.exists():
            kills, log = _kill_and_resume(workdir)
            summary.write_text(json.dumps({"kills": kills, "log": log}))
    record = json.loads(summary.read_text())
    return workdir, record["log"], record["kills"]


def _kill_and_resume(workdir):
    """Runs the tiny pipeline, SIGKILLing it inside cls, pseudo and seg, then to completion."""
    marker = lambda stage: (workdir / "stages" / f"{stage}.json").exists()
    pngs = lambda: list((workdir / "pseudo" / "ppmg" / "train").glob("*.png"))
    kill_points = {
        "cls": lambda: (workdir / "cls" / "ckpt" / "4").exists() and not marker("cls"),
        "pseudo": lambda: len(pngs()) >= 1 and not marker("pseudo"),
        "seg": lambda: (workdir / "seg" / "ce" / "ckpt" / "4").exists() and not marker("seg"),
    }
    kills = []
    for stage, stop_when in kill_points.items():
        code, killed, _ = run_main_until(workdir, stop_when)
        if killed:
            kills.append(stage)
        else:
            assert code == 0, f"the tiny pipeline failed before reaching stage {stage}"
    code, _, log = run_main_until(workdir)
    assert code == 0, log[-3000:]
    return kills, log


@pytest.fixture
def rng():
    """A fresh numpy generator, seed 0."""
    import numpy as np

    return np.random.default_rng(0)


@pytest.fixture
def present():
    """Image-level labels of 4 classes with one absent (tests/masks/test_cvs.py, test_ppmg.py)."""
    import numpy as np

    return np.array([True, False, True, True])


@pytest.fixture
def valid():
    """A 12 x 10 valid-pixel mask with bottom and right padding, the size of
    ``tests/support/pseudo_mask_reference.py``'s maps."""
    import numpy as np

    mask = np.ones((12, 10), bool)
    mask[9:, :] = False  # bottom padding
    mask[:, 8:] = False  # right padding
    return mask


@pytest.fixture(params=["numpy", "jax"])
def core_xp(request):
    """``pmm_jax.masks.core``'s functions bound to one array module: numpy as the CPU workers
    call them, or jax.numpy jitted as the device does (tests/test_cvs.py, test_ppmg.py)."""
    import functools
    import types

    from pmm_jax.masks import core

    names = ("normalize", "coefficient_of_variation", "cvs", "joint_probs", "binary_probs",
             "argmax_labels", "confident_labels", "ppmg_labels")
    if request.param == "numpy":
        import numpy as np

        return types.SimpleNamespace(
            **{n: functools.partial(getattr(core, n), np) for n in names})
    import jax
    import jax.numpy as jnp

    static = {"normalize": ("official_minmax",), "joint_probs": ("alpha",),
              "binary_probs": ("alpha",)}
    return types.SimpleNamespace(**{n: jax.jit(functools.partial(getattr(core, n), jnp),
                                               static_argnames=static.get(n, ()))
                                    for n in names})
