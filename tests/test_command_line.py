"""``command_line``: an error is one ``error:`` paragraph and the process ends at once with
status 1, even with a non-daemon thread still running (which would keep a plain
``sys.exit`` waiting forever)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import threading, time
threading.Thread(target=time.sleep, args=(3600,)).start()  # a non-daemon thread, left running
from pmm_jax.command_line import fail
print("before", flush=False)
fail("the file x.npy is truncated; rerun with --redo=cam")
"""


def test_fail_prints_one_paragraph_and_exits_at_once_despite_a_running_thread():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == "before\n"  # flushed on the way out
    assert proc.stderr == "error: the file x.npy is truncated; rerun with --redo=cam\n"
