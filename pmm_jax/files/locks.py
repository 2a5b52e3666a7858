"""An inter-process lock on a shared data_dir, so concurrent runs build a dataset once.

Two runs in different workdirs may share one ``--config.data.data_dir`` (the README suggests
it). tensorflow-datasets writes a dataset into a temporary folder and renames it into place;
two processes preparing it at once collide (``FileExistsError``). Holding
:func:`data_dir_lock` while preparing makes the second process wait for the first and then
find the dataset prepared.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".pmm_jax_prepare.lock"


@contextlib.contextmanager
def data_dir_lock(data_dir: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``<data_dir>/.pmm_jax_prepare.lock`` (created, with
    ``data_dir``, when missing); blocks while another process holds it. The kernel drops the
    lock when its holder exits, even by ``kill -9``, so a dead run never blocks the next.
    Works on local filesystems (flock is not reliable over NFS)."""
    os.makedirs(data_dir, exist_ok=True)
    fd = os.open(os.path.join(data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing a dataset in %s", data_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
