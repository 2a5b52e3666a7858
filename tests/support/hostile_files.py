"""Hostile CAM files: ``.npy`` pickles that would run code if a reader unpickled them."""

import builtins
import os
import subprocess

import numpy as np


class _Payload:
    """Unpickles to ``func(*args)``: what an attacker's ``__reduce__`` makes a pickle do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_npy(path, marker, how="exec"):
    """Writes ``path``, a ``.npy`` that ``np.load(allow_pickle=True)`` would turn into code
    writing the file ``marker``: through ``builtins.exec``, ``os.system``,
    ``subprocess.call``, or (``"empty"``) ``builtins.eval`` of an expression that writes the
    file and evaluates to ``{}`` (an unpickling reader would return an empty CAM dict)."""
    marker = str(marker)
    payload = {
        "exec": _Payload(builtins.exec, f"open({marker!r}, 'w').write('pwned')"),
        "system": _Payload(os.system, f"touch '{marker}'"),
        "subprocess": _Payload(subprocess.call, ["touch", marker]),
        "empty": _Payload(builtins.eval, f"(open({marker!r}, 'w').write('pwned'), {{}})[1]"),
    }[how]
    np.save(path, payload, allow_pickle=True)
    return str(path)
