"""pmm_jax/export.py and segmentation/exporting.py: the artifact, its meta and ``load``.

That an export's labels equal ``pmm_jax.predict --nocrf`` on a trained segmenter is checked
end to end in tests/test_folder_rehearsal.py; here a random tiny PSPNet is enough.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import configs
from pmm_jax import models
from pmm_jax.segmentation import canvas, exporting, inference

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("background", "rust", "mildew")
# One pass, no flip or window: the full test-time pipeline's export is the rehearsal's.
EVAL = {"rule": "mmseg", "scales": (1.0,), "flip": False, "sliding_window": None, "crf": True}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny segmenter of configs/folder.py:tiny (its classifier scaled up so that
    its labels vary over an image), exported; returns (dir, model, eval config)."""
    config = configs.get_config("folder", "tiny")
    model = models.build_segmenter(config.seg.model, len(CLASSES), models.init_rngs(1))
    model.decode_head.classifier.kernel[...] *= 300.0
    model.eval()
    out = tmp_path_factory.mktemp("export")
    exporting.export_segmenter(model, EVAL, CLASSES, (40, 32), "pus", str(out))
    return out, model, EVAL


def test_meta_says_how_to_feed_the_artifact(exported):
    out, _, _ = exported
    meta = json.loads((out / "meta.json").read_text())
    assert meta["class_names"] == list(CLASSES) and meta["canvas"] == [40, 32]
    assert meta["palette"][:2] == [[0, 0, 0], [128, 0, 0]]
    assert meta["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["test_time"] == {"scales": [1.0], "flip": False, "sliding_window": None,
                                 "crf": False}
    assert "cpu" in meta["platforms"]
    assert {p.name for p in out.iterdir()} == {"meta.json", "segmenter.jax_export", "weights.npz"}


def test_load_matches_the_predictor_without_crf_on_any_size(exported):
    from pmm_jax.export import load

    out, model, eval_cfg = exported
    segment = load(str(out))
    predict = inference.Predictor(model, dict(eval_cfg, crf=False))
    rng = np.random.default_rng(1)
    for size in ((40, 32), (17, 29), (90, 50)):
        image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        labels = segment(image)
        x, _, inner = canvas.fit(image, (40, 32))
        batch = {"image": np.zeros((4, 40, 32, 3), np.float32), "valid": np.arange(4) == 0}
        batch["image"][0] = x
        expected = canvas.restore(predict(batch)[0], inner, size)
        assert labels.shape == size and labels.dtype == np.uint8
        assert len(np.unique(labels)) > 1
        np.testing.assert_array_equal(labels, expected)


def test_load_needs_neither_flax_nor_tensorflow_nor_a_config(exported):
    out, _, _ = exported
    script = f"""
import sys
for name in ("flax", "tensorflow", "tensorflow_datasets", "ml_collections", "optax", "orbax",
             "absl.flags", "PIL"):
    sys.modules[name] = None  # any import of these fails
import numpy as np
from pmm_jax.export import load
segment = load({str(out)!r})
print(segment(np.zeros((50, 20, 3), np.uint8)).shape, segment.meta["class_names"])
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(50, 20) ['background', 'rust', 'mildew']" in proc.stdout


def test_load_gives_the_program_alone_for_a_server_that_fits_images_itself(exported):
    from pmm_jax.export import load

    out, _, _ = exported
    segment = load(str(out))
    image = np.random.default_rng(2).integers(0, 255, (40, 32, 3), dtype=np.uint8)
    x, _, _ = canvas.fit(image, (40, 32))
    np.testing.assert_array_equal(segment.program(x[None]), segment(image))


def test_export_files_are_readable_by_others_under_the_usual_umask(exported):
    out, _, _ = exported
    for path in out.iterdir():  # not mkstemp's 600: a server of another user reads them
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_out_that_is_a_file_is_refused_before_the_model_is_loaded(tmp_path):
    (tmp_path / "model").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.export", f"--workdir={tmp_path / 'nowhere'}",
         f"--out={tmp_path / 'model'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --out=") and "is a file, not a folder" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
