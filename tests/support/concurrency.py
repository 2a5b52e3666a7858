"""Concurrent preparations of a dataset: run a function in threads at once, and record how many
builder preparations overlapped."""

import threading
import time


def overlap_recorder(patch, builder_cls):
    """Wraps ``builder_cls.download_and_prepare`` to record how many ran at once (each call
    lingers 0.3 s, so two unserialised preparations always overlap)."""
    state = {"active": 0, "most": 0}
    original = builder_cls.download_and_prepare

    def recording(self, *args, **kwargs):
        state["active"] += 1
        state["most"] = max(state["most"], state["active"])
        time.sleep(0.3)
        try:
            return original(self, *args, **kwargs)
        finally:
            state["active"] -= 1

    patch.setattr(builder_cls, "download_and_prepare", recording)
    return state


def run_concurrently(fn, count=2):
    """Runs ``fn()`` in ``count`` threads at once; returns the exceptions they raised."""
    errors, barrier = [], threading.Barrier(count)

    def target():
        barrier.wait()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (collected for the assertion)
            errors.append(err)

    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors
