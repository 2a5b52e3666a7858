"""Imports TensorFlow with its load-time C++ log lines filtered by ``TF_CPP_MIN_LOG_LEVEL``.

TensorFlow 2.21 logs through absl while its libraries load, before absl's logging is
initialised, and such lines go straight to stderr whatever ``TF_CPP_MIN_LOG_LEVEL`` says:
"oneDNN custom operations are on" (once per library, so twice), each after absl's own
"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR".
``pmm_jax.main`` sets the level to 3, yet every run's stderr (and every one-line error, such
as a dataset that is not prepared) would open with those four lines. :func:`import_tensorflow`
points file descriptor 2 at a temporary file while TensorFlow loads and writes back only the
lines the level lets through; lines that are not absl/glog log lines are always written back.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile

# An absl/glog line: severity letter, then MMDD (or 0000 before absl is initialised).
LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
ABSL_PREINIT_WARNING = "WARNING: All log messages before absl::InitializeLog() is called"


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it (0 = everything; unset or junk = 0)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def shown(line: str, level: int) -> bool:
    """Whether ``line`` of TensorFlow's load-time stderr passes minimum log level ``level``."""
    if line.startswith(ABSL_PREINIT_WARNING):  # a preface to the INFO lines that follow it
        return level == 0
    match = LOG_LINE.match(line)
    return match is None or SEVERITY[match.group(1)] >= level


def import_tensorflow():
    """``import tensorflow``, its load-time log lines filtered by ``TF_CPP_MIN_LOG_LEVEL``."""
    return import_quietly("tensorflow")


def import_quietly(name: str):
    """Imports module ``name`` with file descriptor 2 captured, then writes back the captured
    lines that :func:`shown` passes at ``TF_CPP_MIN_LOG_LEVEL`` (also when the import fails)."""
    if name in sys.modules:
        return sys.modules[name]
    level = min_log_level()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture
        return importlib.import_module(name)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            return importlib.import_module(name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if shown(line, level)))
            sys.stderr.flush()
