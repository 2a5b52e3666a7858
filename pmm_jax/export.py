r"""Exports a run's segmenter for serving, and loads an export with jax and numpy alone.

    python -m pmm_jax.export --workdir=W [--run=NAME] --out=DIR

writes ``DIR/segmenter.jax_export`` (the forward pass without the CRF, a serialized
``jax.export`` artifact), ``DIR/weights.npz`` and ``DIR/meta.json`` (class names, palette,
canvas and input size rules, normalisation; ``pmm_jax/segmentation/exporting.py``). The run
is ``--run``, else the one ``pmm_jax.predict`` would take (best val mIoU, or PUS).

    from pmm_jax.export import load
    segment = load(DIR)              # needs jax and numpy only: no Flax, TensorFlow, config
    labels = segment(image)          # uint8 [H, W, 3] of any size -> uint8 [H, W]

``segment(image)`` equals ``python -m pmm_jax.predict --nocrf`` on the same image. This
module imports only jax, numpy and the numpy-only ``pmm_jax.segmentation.canvas`` at load
time; the export command imports the rest when it runs.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from pmm_jax.segmentation import canvas

PROGRAM = "segmenter.jax_export"  # the names of pmm_jax/segmentation/exporting.py
WEIGHTS = "weights.npz"
META = "meta.json"


def load(directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported segmenter in ``directory`` as ``segment(image) -> labels``: ``image``
    uint8 ``[H, W, 3]`` (or ``[H, W]`` greyscale) of any size, ``labels`` uint8 ``[H, W]``
    class indices (``segment.meta["class_names"]``). Runs on this process's default jax
    device (CPU, or a GPU/TPU the artifact was lowered for: ``meta["platforms"]``).
    ``segment.program(x)`` is the program alone: ``x`` float32 ``[1, canvas_h, canvas_w, 3]``
    as ``meta["input"]`` describes -> uint8 ``[canvas_h, canvas_w]``."""
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    with open(os.path.join(directory, PROGRAM), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, WEIGHTS)) as arrays:
        weights = [jax.device_put(arrays[f"w{i}"]) for i in range(len(arrays.files))]
    call = jax.jit(exported.call)
    size = tuple(meta["canvas"])

    def segment(image: np.ndarray) -> np.ndarray:
        image = canvas.as_rgb(image)
        x, _, inner = canvas.fit(image, size)
        labels = np.asarray(call(weights, x[None]))
        return canvas.restore(labels, inner, image.shape[:2])

    segment.meta = meta
    segment.program = lambda x: np.asarray(call(weights, x))  # float32 [1, *canvas, 3] -> labels
    return segment


def export(workdir: str, out: str, run: str | None = None) -> dict:
    """Writes the export of ``workdir``'s segmenter ``run`` (None: predict's choice) to
    ``out``; returns its meta."""
    from pmm_jax.files.workdir import Workdir
    from pmm_jax.segmentation import exporting, predict_images
    from pmm_jax.segmentation.best_checkpoint import load_segmenter

    workdir, out = os.path.expanduser(workdir), os.path.expanduser(out)
    if os.path.lexists(out) and not os.path.isdir(out):  # checked before the model is lowered
        raise predict_images.PredictError(f"--out={out} is a file, not a folder; name a folder "
                                          "(created when absent) for the export")
    wd = Workdir(workdir)
    config = predict_images.run_config(workdir)
    name = predict_images.choose_run(config, wd, run)
    facts = predict_images.dataset_facts(wd)
    model = load_segmenter(config, wd, name, facts.num_classes)
    return exporting.export_segmenter(model, config.eval.to_dict(), facts.class_names,
                                      facts.canvas, name, out)


def _main() -> None:
    """The command line (absl, imported here: ``load`` does not need it)."""
    from absl import app, flags, logging

    flags.DEFINE_string("workdir", None, "Workdir of a run with a finished segmenter.")
    flags.DEFINE_string("out", None, "Folder to write the export to.")
    flags.DEFINE_string("run", None, "Segmenter run to export (e.g. pus, ce, cycle1); default: "
                        "the best by val mIoU, or pus when there is no val.")
    flags.mark_flags_as_required(["workdir", "out"])

    def main(argv):
        from pmm_jax.command_line import fail
        from pmm_jax.segmentation.predict_images import PredictError
        from pmm_jax.training.checkpoints import CheckpointError

        if len(argv) > 1:
            fail(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.ERROR)  # orbax's notices
        try:
            meta = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.run)
        except (PredictError, FileNotFoundError, CheckpointError) as err:
            fail(str(err))
        print(f"exported segmenter '{meta['run']}' to {flags.FLAGS.out} (canvas "
              f"{meta['canvas'][0]}x{meta['canvas'][1]}, platforms {', '.join(meta['platforms'])})")

    app.run(main)




if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _main()
