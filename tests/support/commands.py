"""The project's commands run in a subprocess from the repository root."""

import os
import subprocess
import sys
from tests.support.paths import ROOT



def run_main(*args, timeout=120):
    """Runs ``python -m pmm_jax.main`` from the repo root; returns the completed process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "pmm_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
