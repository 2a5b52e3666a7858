"""bench/segmenter_step.py (and bench/classifier_step.py) on a GPU machine's install.

* With clu, TensorFlow, tensorflow-datasets, ml_collections and pydensecrf unimportable
  (a ``sitecustomize`` puts ``None`` in ``sys.modules`` for each, as on a machine that has only
  jax/flax/optax/orbax/numpy/torch), both benchmarks, their PyTorch modules and ``bench.suite``
  import (the suite skips the pydensecrf pool row naming what is missing), and each
  benchmark builds and lowers its bfloat16 JAX step (the seg stage's step; the SEAM step). (A
  whole tiny run, compiled, was checked by hand the same way: too slow for the suite.)
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCKED = ("clu", "tensorflow", "tensorflow_datasets", "ml_collections", "pydensecrf")


def test_benches_run_without_tensorflow_clu_ml_collections_pydensecrf(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED))
    script = """
from bench import classifier_step, classifier_torch, segmenter_step, segmenter_torch, step_memory
from bench import pseudo_masks, suite, suite_report, units
rows = {r.name: r for r in suite.ROWS}
device = suite.Device("gpu", "H100", 1, {})
assert suite.skip_reason(rows["pseudo_masks"], device) == (
    "needs pydensecrf, ml_collections (not installed)")
assert suite.skip_reason(rows["seam_f32"], device) is None
micro = ["--crop=32", "--batch=4", "--num_classes=3", "--dtype=bfloat16", "--width_div=32",
         "--blocks=1,1,1,1"]
for module, args in ((segmenter_step, micro), (classifier_step, ["--method=seam", *micro])):
    step, state, batch = module.build_jax(module.parse_args(args))
    assert "bf16" in step.lower(state, batch).as_text()
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
               JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
