"""``files/locks.py``: the data_dir lock waits for another holder and dies with its holder."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from pmm_jax.files.locks import data_dir_lock


def test_second_holder_waits_until_the_first_releases(tmp_path):
    events = []
    entered = threading.Event()

    def second():
        with data_dir_lock(str(tmp_path / "tfds")):
            events.append("second")
            entered.set()

    with data_dir_lock(str(tmp_path / "tfds")):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.5), "the second holder did not wait"
        events.append("first done")
    thread.join(10)
    assert events == ["first done", "second"]


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pmm_jax.files.locks import data_dir_lock\n"
         f"with data_dir_lock({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(10)
        start = time.perf_counter()
        with data_dir_lock(str(tmp_path)):
            assert time.perf_counter() - start < 5
    finally:
        holder.kill()
        holder.wait()
