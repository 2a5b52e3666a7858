"""The suite's own scheduling: ``--dist loadgroup`` keeps an ``xdist_group`` on one worker.

The expensive fixtures (the two-process run, the tiny kill-and-resume run) rely on it; with
pytest 9.2 and pytest-xdist 3.8 the group marker was silently ignored and the two-process run
ran twice, once per worker (setup.cfg pins pytest below 9.2).
"""

import os
import subprocess
import sys
import textwrap


def test_an_xdist_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(textwrap.dedent("""
        import os, pytest
        pytestmark = pytest.mark.xdist_group("g")

        @pytest.fixture(scope="module")
        def setup_once():
            with open(os.environ["SETUP_LOG"], "a") as log:
                log.write(f"{os.getpid()}\\n")

        @pytest.mark.parametrize("i", range(8))
        def test_grouped(setup_once, i):
            pass
    """))
    (tmp_path / "test_other.py").write_text(
        "import pytest\n@pytest.mark.parametrize('i', range(8))\ndef test_other(i):\n    pass\n")
    log = tmp_path / "setups.log"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
         "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=dict(os.environ, SETUP_LOG=str(log)), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert len(log.read_text().split()) == 1, "the group's module fixture ran on two workers"
