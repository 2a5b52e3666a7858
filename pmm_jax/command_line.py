"""What the package's commands share: an error as one paragraph, then a prompt exit.

``python -m pmm_jax.main``, ``pmm_jax.predict`` and ``pmm_jax.export`` end every error the
same way, so a user (or a cluster job) never sees a traceback or a process that lingers.
"""

from __future__ import annotations

import contextlib
import os
import sys


def fail(message: str) -> None:
    """Ends the process with ``message`` as one paragraph (``error: ...``) on stderr and exit
    status 1."""
    sys.stderr.write(f"error: {message}\n")
    end_now(1)


def end_now(status: int) -> None:
    """Flushes the output and ends the process at once with ``status``.

    On an error, a thread that is still running (a tf.data prefetch iterator, an orbax
    checkpoint writer, a CRF process pool's manager) would otherwise keep the process alive
    after its message, holding a cluster job's accelerators idle until it is killed;
    ``os._exit`` skips waiting for them. Callers release their locks on the way out (``with``
    blocks) and finished outputs are already renamed into place.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
