"""pmm_jax/data/tf_quiet.py: TensorFlow's load-time log lines obey TF_CPP_MIN_LOG_LEVEL."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pmm_jax.data import tf_quiet

ROOT = Path(__file__).resolve().parents[2]
INFO = "I0000 00:00:1796596115.398503   19724 port.cc:153] oneDNN custom operations are on.\n"
WARNING = "W1206 22:15:01.173820 1400 loader.cc:9] a warning\n"
ERROR = "E1206 22:15:01.173820 1400 loader.cc:9] an error\n"
PREFACE = tf_quiet.ABSL_PREINIT_WARNING + " are written to STDERR\n"


@pytest.mark.parametrize("level, kept", [
    (0, [PREFACE, INFO, WARNING, ERROR, "plain\n"]),
    (1, [WARNING, ERROR, "plain\n"]),
    (2, [ERROR, "plain\n"]),
    (3, ["plain\n"]),
])
def test_shown_follows_the_minimum_log_level(level, kept):
    lines = [PREFACE, INFO, WARNING, ERROR, "plain\n"]
    assert [line for line in lines if tf_quiet.shown(line, level)] == kept


def run_python(code, tmp_path, level):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
               TF_CPP_MIN_LOG_LEVEL=level, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_quietly_filters_what_a_module_writes_to_fd_2_while_it_loads(tmp_path):
    """A module that writes C++-style log lines straight to file descriptor 2 (as
    TensorFlow's libraries do): at level 3 only its non-log line comes back, at 0 all."""
    (tmp_path / "noisy.py").write_text(
        f"import os\nos.write(2, {(PREFACE + INFO + ERROR + 'kept line' + chr(10)).encode()!r})\n"
        "VALUE = 7\n")
    code = """
        from pmm_jax.data import tf_quiet
        print(tf_quiet.import_quietly("noisy").VALUE)
    """
    quiet = run_python(code, tmp_path, "3")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "7\n" and quiet.stderr == "kept line\n"
    loud = run_python(code, tmp_path, "0")  # (TensorFlow's own lines come first, unfiltered)
    assert loud.stderr.endswith(PREFACE + INFO + ERROR + "kept line\n")


def test_a_failing_import_still_writes_back_its_lines_and_raises(tmp_path):
    (tmp_path / "broken.py").write_text(
        f"import os\nos.write(2, {(INFO + 'why it broke' + chr(10)).encode()!r})\n"
        "raise ImportError('broken on purpose')\n")
    proc = run_python("""
        from pmm_jax.data import tf_quiet
        try:
            tf_quiet.import_quietly("broken")
        except ImportError as err:
            print(err)
    """, tmp_path, "3")
    assert proc.stdout == "broken on purpose\n" and proc.stderr == "why it broke\n"


def test_importing_the_data_package_at_level_3_writes_nothing_to_stderr(tmp_path):
    """TensorFlow 2.21 writes "oneDNN custom operations are on" and absl's pre-init warning
    whatever TF_CPP_MIN_LOG_LEVEL says; through pmm_jax.data they are gone."""
    proc = run_python("import pmm_jax.data.pipeline", tmp_path, "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
