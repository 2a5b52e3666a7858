r"""Segments new images with a run's segmenter.

    python -m pmm_jax.predict --workdir=W --images=PATH --out_dir=O [--run=NAME] [--overlay] \
        [--nocrf]

PATH is an image file or a folder of .jpg/.jpeg/.png images. Writes ``O/<id>.png``, a
palette mask at the image's own size (0 background, i class i of the run's dataset), and with
``--overlay`` also ``O/<id>_overlay.jpg`` (the image with the mask blended in and a legend of
the classes present). The run's test-time pipeline (``config.eval``: scales, flip, CRF);
``--nocrf`` (or ``--crf=false``) turns its CRF off, ``--crf`` on. The segmenter is ``--run``,
else the run's best by val mIoU, else (no val) its PUS run. Images already done are skipped:
each output records what made it (run, checkpoint step and weights, settings, version,
source image); one made differently is refused unless ``--overwrite`` (which redoes it), a
file there that predict did not write is never overwritten, and ``O`` may not be the images'
folder.
The library is ``pmm_jax/segmentation/predict_images.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from pmm_jax.command_line import fail  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a run with a finished segmenter.")
_IMAGES = flags.DEFINE_string("images", None, "An image file or a folder of images.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the masks (<id>.png).")
_RUN = flags.DEFINE_string("run", None, "Segmenter run (e.g. pus, ce, cycle1); default: the "
                           "best by val mIoU, or pus when the dataset has no val.")
_OVERLAY = flags.DEFINE_boolean("overlay", False, "Also write <id>_overlay.jpg: the image with "
                                "the mask blended in and a legend.")
_CRF = flags.DEFINE_boolean("crf", None, "Dense CRF on (--crf) or off (--nocrf); default: the "
                            "run's config.eval.crf.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Redo outputs in --out_dir that were "
                                  "predicted differently (another run, checkpoint, settings, "
                                  "version or image); files predict did not write are never "
                                  "overwritten.")
flags.mark_flags_as_required(["workdir", "images", "out_dir"])


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    from pmm_jax.files import safe_io
    from pmm_jax.segmentation import predict_images
    from pmm_jax.training import checkpoints

    try:
        result = predict_images.predict_images(
            _WORKDIR.value, _IMAGES.value, _OUT_DIR.value, run=_RUN.value,
            overlay=_OVERLAY.value, crf=_CRF.value, overwrite=_OVERWRITE.value)
    except (predict_images.PredictError, FileNotFoundError, checkpoints.CheckpointError,
            safe_io.NonFiniteError) as err:
        fail(str(err))
    print(f"segmenter '{result['run']}': wrote {result['written']} mask(s) to {_OUT_DIR.value}"
          + (f", skipped {result['skipped']} already done" if result["skipped"] else ""))


if __name__ == "__main__":
    app.run(main)
