"""Seconds and host memory to segment one 12-megapixel photo at configs/voc.py's canvas.

Three ways through the same PSPNet (``bench/segmenter_step.py``'s ``seg_config``, random
weights: the figures are about time, not labels) on a 4032x3024 RGB photo:

* ``predict``: ``pmm_jax.predict``'s per-image path without the CRF
  (``predict_images.ImageSegmenter``: ``segmentation/canvas.py`` shrinks the photo onto the
  512x512 canvas, the Predictor runs, the labels go back to the photo's size);
* ``export_load``: ``pmm_jax.export.load``'s ``segment(photo)`` on an export of that model;
* ``baseline``: PIL's BILINEAR resize, normalisation, the exported program alone, PIL's
  NEAREST resize back: what any server would do around the model.

Each is called once to compile, then timed ``repeats`` times (the mean is reported); the
host peak is tracemalloc's over one call (numpy's allocations included; XLA's own buffers
are not), the process's peak RSS is reported once. ``shrink_vs_pil`` says how far the
canvas's antialiased filter is from PIL's resize (its max difference and the share of
pixels off by more than 1): the two are different filters, so small differences are expected.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc

from bench import config_values

PHOTO = (3024, 4032)  # a 12 MP phone photo, (height, width)
CANVAS = tuple(config_values.get_config("voc").data.eval_pad_to)


def _timed(fn, repeats: int):
    """``(result, mean seconds, host peak bytes)`` of ``fn()`` after one untimed call."""
    fn()
    seconds = []
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, sum(seconds) / len(seconds), peak


def run(args: dict) -> dict:
    """The row's figures (called in a child process by ``bench/suite.py``)."""
    import numpy as np
    from PIL import Image

    from bench import segmenter_step
    from pmm_jax.export import load
    from pmm_jax.segmentation import canvas, exporting, predict_images
    from pmm_jax.segmentation import segmenter

    step_args = argparse.Namespace(width_div=args["width_div"], blocks=args["blocks"],
                                   dtype="float32", num_classes=21, remat=False)
    config = segmenter_step.seg_config(step_args)
    model = segmenter.build_model(config, config.seed)
    model.eval()
    eval_cfg = {"scales": list(args["scales"]), "flip": args["flip"],
                "sliding_window": args["sliding_window"], "crf": False}
    names = tuple(f"class{i}" for i in range(21))
    facts = predict_images.DatasetFacts("bench", names, CANVAS)
    rng = np.random.default_rng(0)
    # A smooth picture (a photo's neighbouring pixels are alike) with noise.
    ramp = np.linspace(0, 255, PHOTO[1], dtype=np.float32)[None, :, None]
    photo = np.clip(ramp * 0.6 + rng.normal(60, 20, (*PHOTO, 3)).astype(np.float32),
                    0, 255).astype(np.uint8)
    repeats = args["repeats"]
    figures = {"photo": list(PHOTO), "canvas": list(CANVAS), "eval": eval_cfg,
               "model": {"width_div": args["width_div"], "blocks": args["blocks"]}}

    segment = predict_images.ImageSegmenter.of_model(model, facts, eval_cfg)
    predicted, figures["predict_s"], figures["predict_host_peak_mb"] = _timed(
        lambda: segment([photo])[0], repeats)

    with tempfile.TemporaryDirectory() as out:
        exporting.export_segmenter(model, eval_cfg, names, CANVAS, "bench", out)
        exported = load(out)
        from_export, figures["export_load_s"], figures["export_load_host_peak_mb"] = _timed(
            lambda: exported(photo), repeats)

        inner = canvas.fitted_size(PHOTO, CANVAS)

        def baseline():
            small = np.asarray(Image.fromarray(photo).resize(inner[::-1], Image.BILINEAR))
            x = np.zeros((1, *CANVAS, 3), np.float32)
            x[0, :inner[0], :inner[1]] = canvas.normalize(small)
            labels = exported.program(x)[:inner[0], :inner[1]]
            return np.asarray(Image.fromarray(labels).resize(PHOTO[::-1], Image.NEAREST))

        _, figures["baseline_s"], figures["baseline_host_peak_mb"] = _timed(baseline, repeats)
        x = np.zeros((1, *CANVAS, 3), np.float32)
        _, figures["model_alone_s"], _ = _timed(lambda: exported.program(x), repeats)

    _, figures["shrink_s"], figures["shrink_host_peak_mb"] = _timed(
        lambda: canvas.shrink(photo, inner), repeats)
    pil, figures["pil_resize_s"], _ = _timed(
        lambda: np.asarray(Image.fromarray(photo).resize(inner[::-1], Image.BILINEAR)), repeats)
    difference = np.abs(canvas.shrink(photo, inner).astype(int) - pil)
    figures["shrink_vs_pil"] = {"max": int(difference.max()),
                                "share_over_1": float((difference > 1).mean())}
    figures["predict_equals_export"] = bool(np.array_equal(predicted, from_export))
    for key in [k for k in figures if k.endswith("_peak_mb")]:
        figures[key] = round(figures[key] / 2**20, 1)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures
