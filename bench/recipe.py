"""Projected time of the paper recipe (``configs/voc.py``, ``configs/coco.py``) on this device.

Times one unit of every costly stage at the paper's shapes (``bench/units.py``), then
multiplies by the recipe's counts read from the configs (steps, images, runs) and prints projected hours per stage and in
total, one table per dataset:

* ``cls``: one classifier train step (the config's method and backbone, SEAM on ResNet38-d,
  crop 448, the config's batch, the trainer's jitted step) x ``cls.num_steps``.
* ``cam``: multi-crop CAMs of one 500x375 image (``pmm_jax.cams.multicrop_inference.MultiCropCAM``: all
  ten scales, crop 448, stride 300, flips, the config's tile batch) x (train + val images).
* ``pseudo``: the PPMG pseudo-mask of one such image (``pmm_jax.masks.generator.generate``, two
  present classes) with each CRF backend x train images (+ the other variants on
  ``pseudo.eval_subset`` images, at PPMG's cost). The pydensecrf backend is timed in CPU
  seconds per image (one worker) and projected over a pool of every core of this machine; the
  jax backend runs in-process (wall seconds).
* ``seg``: one PSPNet train step (the config's backbone, crop 512, PUS loss + auxiliary head)
  x ``seg.num_steps`` x runs (``seg.runs`` + cyclic rounds). Batches larger than
  ``--max_seg_batch`` are timed at that size and scaled linearly.
* ``seg val``: the in-training validation (``seg.eval_every``) on val with the test pipeline.
* ``cycle masks``: test-time inference of the train split (cyclic pseudo-masks).
* ``eval``: test-time inference of one image x val images x segmenters: what
  ``pmm_jax.segmentation.inference.Predictor`` runs, timed as its device part
  (``inference.device_fn``: sliding window 512/480, six scales, flip, softmax average)
  plus the dense CRF of the averaged probabilities with each backend.

Every model is built as its stage builds it, computing in the config's ``compute_dtype``
(``pmm_jax.training.precision.set_compute_dtype``; "auto" is bfloat16 on a GPU/TPU, float32 on the CPU).
Every unit is timed after one untimed call (compilation), as the best of ``--repeats``;
``--units`` restricts which are timed (the others print "not timed").
Input pipelines, checkpoints and file writing are not timed. One image or one batch at a time
on this process's devices: a projection, not a measurement of a full run.

``--shrink`` divides every network width by 8 and every resolution (images, crops, strides,
windows) by 4 and keeps one block per stage, so the run finishes in minutes on a small CPU;
the output is then labelled SHRUNK and its hours are not the paper recipe's.

    python -m bench.recipe                      # full size (GPU): both datasets
    python -m bench.recipe --shrink             # CPU sanity run, labelled SHRUNK
    python -m bench.recipe --datasets=voc --width_div=32 --res_div=16 --shallow --repeats=1

At load this imports only jax, flax and numpy; ml_collections (configs, pseudo-masks)
and pydensecrf are imported where needed, TensorFlow never (no input pipeline runs). Without
pydensecrf its backend is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time

import jax

from bench.units import (
    CRF_BACKENDS,
    Size,
    compute_dtype,
    pydensecrf_available,
    time_cam,
    time_cls,
    time_pseudo_masks,
    time_seg,
    time_test,
)

UNITS = ("cls", "cam", "pseudo", "seg", "test")
SHRINK = {"width_div": 8, "res_div": 4, "shallow": True}


def load_config(dataset: str):
    """``configs/<dataset>.py``'s ``get_config()`` (imports ml_collections)."""
    return importlib.import_module(f"configs.{dataset}").get_config()


# Split sizes of the datasets the configs name (images).
SPLITS = {"voc2012_wsss": {"train_aug": 10582, "train": 1464, "val": 1449},
          "coco2014_wsss/contiguous": {"train": 82783, "val": 40504}}


def counts(config) -> dict:
    """The recipe's units of work: steps, images and runs, from the config."""
    split = SPLITS[config.data.name]
    train, val = split[config.data.train_split], split[config.data.val_split]
    segmenters = len(config.seg.runs) + config.cycle.num_cycles
    others = len([v for v in config.pseudo.variants if v != config.pseudo.train_on])
    # The other variants are made only for the scored images: pseudo.eval_split (its first
    # eval_subset when > 0).
    scored = split[config.pseudo.eval_split]
    scored = min(config.pseudo.eval_subset, scored) if config.pseudo.eval_subset else scored
    # The in-training validation reads val, or its first seg.val_subset images when > 0.
    val_subset = config.seg.get("val_subset", 0)
    validated = min(val_subset, val) if val_subset else val
    return {"train": train, "val": val, "segmenters": segmenters,
            "cls_steps": config.cls.num_steps,
            "cam_images": train + val,
            "pseudo_images": train + others * scored,
            "seg_steps": config.seg.num_steps * segmenters,
            "seg_val_images": (config.seg.num_steps // config.seg.eval_every
                               if config.seg.get("eval_every") else 0) * validated * segmenters,
            "cycle_images": config.cycle.num_cycles * train,
            "eval_images": val * segmenters}


def measure(config, size: Size, args, backends: list[str]) -> dict:
    """Seconds per unit of every stage (pseudo-masks and test time per CRF backend)."""
    out = {"dtype": compute_dtype(config)}

    def timed(key, fn, *fn_args):
        start = time.perf_counter()
        out[key] = fn(*fn_args)
        print(f"  {key}: {out[key]} (measured in {time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)

    units = set(args.units.split(","))
    if "cls" in units:
        timed("cls_step", time_cls, config, size, args.repeats)
    if "cam" in units:
        timed("cam_image", time_cam, config, size, args.repeats)
    if "seg" in units:
        timed("seg", time_seg, config, size, args.repeats, args.max_seg_batch)
        out["seg_step"], out["seg_batch"] = out.pop("seg")
    for backend in backends if "pseudo" in units else ():
        timed(f"pseudo_image/{backend}", time_pseudo_masks, config, size, backend,
              config.pseudo.train_on, args.repeats)
    if "test" in units:
        timed("test", time_test, config, size, backends, args.repeats)
        out.update({f"test_image/{b}": v for b, v in out.pop("test").items()})
    return out


def table(dataset: str, config, t: dict, backends: list[str], cores: int) -> list[str]:
    """Markdown rows: stage, unit, seconds per unit, count, projected hours per CRF backend."""
    n = counts(config)
    nan = float("nan")
    seg_scale = config.seg.batch_size / t.get("seg_batch", config.seg.batch_size)
    per = lambda key: {b: t.get(key.format(b=b), nan) for b in backends}  # noqa: E731
    rows = [("cls", f"train step (batch {config.cls.batch_size}, crop {config.cls.crop_size})",
             per("cls_step"), n["cls_steps"], 1),
            ("cam", "multi-crop CAMs of one image (10 scales, flips)",
             per("cam_image"), n["cam_images"], 1),
            ("pseudo", "PPMG pseudo-mask of one image",
             per("pseudo_image/{b}"), n["pseudo_images"], None),
            ("seg", f"train step (batch {config.seg.batch_size}, crop {config.seg.crop_size})",
             {b: v * seg_scale for b, v in per("seg_step").items()}, n["seg_steps"], 1),
            ("seg val", "test-time inference of one image (window, scales, flip, CRF)",
             per("test_image/{b}"), n["seg_val_images"], 1),
            ("cycle masks", "test-time inference of one image",
             per("test_image/{b}"), n["cycle_images"], 1),
            ("eval", "test-time inference of one image",
             per("test_image/{b}"), n["eval_images"], 1)]
    lines = [f"### {dataset}: projected hours ({config.data.name}, {n['train']} train / "
             f"{n['val']} val images, {n['segmenters']} segmenter(s))", "",
             "| stage | unit | " + " | ".join(f"s/unit ({b})" for b in backends) + " | count | "
             + " | ".join(f"hours ({b} CRF)" for b in backends) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in backends) + " | ---: | "
             + " | ".join("---:" for _ in backends) + " |"]
    totals = {b: 0.0 for b in backends}
    for stage, unit, seconds, count, parallel in rows:
        hours = {}
        for b in backends:
            # pydensecrf pseudo-masks run in a pool of every core; everything else serially.
            workers = parallel or (cores if b == "pydensecrf" else 1)
            hours[b] = seconds[b] * count / workers / 3600 if count else 0.0
            totals[b] += hours[b]
        fmt = lambda v, spec: "not timed" if math.isnan(v) else format(v, spec)  # noqa: E731
        lines.append(f"| {stage} | {unit} | " + " | ".join(fmt(seconds[b], ".3f") for b in backends)
                     + f" | {count} | " + " | ".join(fmt(hours[b], ".2f") for b in backends) + " |")
    lines.append("| **total** | | " + " | ".join("" for _ in backends) + " | | "
                 + " | ".join(f"**{fmt(totals[b], '.1f')}**" for b in backends) + " |")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="voc,coco", help="configs/<name>.py, comma-separated")
    parser.add_argument("--shrink", action="store_true",
                        help=f"preset for a small CPU: {SHRINK} (output labelled SHRUNK)")
    parser.add_argument("--width_div", type=int, default=1, help="divide every network width")
    parser.add_argument("--res_div", type=int, default=1, help="divide every resolution")
    parser.add_argument("--shallow", action="store_true", help="one block per backbone stage")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per unit (best kept)")
    parser.add_argument("--max_seg_batch", type=int, default=16,
                        help="larger segmenter batches are timed at this size, scaled linearly")
    parser.add_argument("--units", default=",".join(UNITS),
                        help="units to time (others print 'not timed'): " + ",".join(UNITS))
    parser.add_argument("--backends", default=",".join(CRF_BACKENDS),
                        help="CRF backends to time (pydensecrf is skipped when not installed)")
    args = parser.parse_args(argv)
    if args.shrink:
        args.width_div, args.res_div, args.shallow = (SHRINK["width_div"], SHRINK["res_div"],
                                                      SHRINK["shallow"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    size = Size(args.width_div, args.res_div, args.shallow)
    backends = [b for b in args.backends.split(",") if b]
    notes = []
    if "pydensecrf" in backends and not pydensecrf_available():
        backends.remove("pydensecrf")
        notes.append("pydensecrf is not installed: its CRF backend was skipped")
    cores = len(os.sched_getaffinity(0))
    device = jax.devices()[0]
    print(f"# Projected paper-recipe time: {size.label()}")
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); host "
          f"{platform.node()} with {cores} cores, load {os.getloadavg()[0]:.1f} at start; "
          f"jax {jax.__version__}")
    for dataset in [d for d in args.datasets.split(",") if d]:
        config = load_config(dataset)
        start = time.perf_counter()
        t = measure(config, size, args, backends)
        print()
        print("\n".join(table(dataset, config, t, backends, cores)))
        seg_batch = f"; segmenter step timed at batch {t['seg_batch']}" if "seg_batch" in t else ""
        print(f"\nprecision: {t['dtype']}{seg_batch}; measured in "
              f"{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")
    for note in notes + [
            "one image / one batch at a time; input pipelines, checkpoints and file writes not "
            f"timed; pydensecrf pseudo-masks projected over a pool of {cores} cores"]:
        print(f"note: {note}")
    if not size.full:
        print(f"note: {size.label()}")


if __name__ == "__main__":
    main()
