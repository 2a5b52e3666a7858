"""`python -m bench.suite`: every speed and memory figure of the project, one command, one table.

    python -m bench.suite --out=DIR [--quick] [--budget_s=N] [--only=seam,pspnet,...]

Runs the rows of :data:`ROWS` in order of importance and writes ``DIR/results.json`` (every
figure, with device, versions, date, load and command) and ``DIR/results.md`` (the tables).

* Train steps (``seam``, ``pspnet``, ``plain``; ``*_no_remat``; ``*_f32``): the SEAM
  classifier step, the PSPNet step (the ``seg`` stage's own step) and the plain classifier
  step (``bench/classifier_step.py``, ``bench/segmenter_step.py``) as the configs run them
  (``compute_dtype="auto"``: bfloat16 on a GPU/TPU, float32 on a CPU; remat on), without
  remat, and in float32; each against the same network in PyTorch (AMP for bf16) when torch
  is installed (``*_no_remat`` rows reuse their base row's PyTorch figures). Figures:
  images/s, step time, compile time, peak memory (the allocator's peak on a GPU/TPU, peak RSS
  on a CPU), XLA's FLOPs per step and their share of the device's bf16 peak, final loss
  finite. Each framework runs in its own spawned process.
* ``pseudo_masks``: ``python -m pmm_jax.pseudo_masks`` with a worker per core against a
  one-process official loop, seconds per image, speed-up against its target (0.9 x cores),
  mask agreement (``bench/pseudo_masks.py``; needs pydensecrf).
* ``pseudo_masks_jax``: the generator with ``crf.backend=jax`` (the whole path jitted).
* ``cam``: multi-crop CAMs of one 500x375 image at configs/voc.py's scales (``bench/units.py``).
* ``compile:<program>@<target>``: a program of the configs compiled, without the device, for a
  TPU slice or an NVIDIA GPU: per-chip memory against the chip's, FLOPs, roofline and the
  recipe's hours (``bench/compile_table.py``; compiled, not run; minutes each at full size).
* ``photo_predict``: ``pmm_jax.predict``'s and ``pmm_jax.export.load``'s seconds and host peak
  memory for one 12 MP photo at configs/voc.py's 512x512 canvas, against PIL's resize + the
  model alone (``bench/photo_predict.py``).

Sizes: on a GPU/TPU the paper's shapes (crop 448/512, batch 16, full networks); on a CPU
reduced ones (``bench/classifier_step.py``'s CPU settings); ``--quick``: small shapes of every
row (a CPU run of a few minutes; the CI test runs a subset). ``--budget_s``: a row is not
started when its estimated time (:data:`ROWS`) would take the run past the budget; such rows
are listed as skipped. A row that fails is reported with its error and the suite goes on.
Needs only jax, flax, optax, orbax and numpy (torch and pydensecrf optional: their parts are
skipped with a reason); JAX runs only in child processes, so the parent never takes a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from typing import Callable



@dataclasses.dataclass(frozen=True)
class Device:
    """What a child process found: platform ("cpu", "gpu", "tpu"), kind, count, versions."""

    platform: str
    kind: str
    count: int
    versions: dict

    @property
    def accelerator(self) -> bool:
        return self.platform != "cpu"

    @property
    def config_dtype(self) -> str:
        """``compute_dtype="auto"`` on this device (``pmm_jax.training.precision.resolve``)."""
        return "bfloat16" if self.accelerator else "float32"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: ``run(device, quick) -> figures``; ``estimate_s`` (quick, CPU, accelerator)
    is what ``--budget_s`` plans with; ``needs``: modules without which it is skipped."""

    name: str
    what: str
    run: Callable[[Device, bool], dict]
    estimate_s: tuple[float, float, float]
    needs: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Child processes (JAX never initialises in the parent)


def device_info(_=None) -> dict:
    import jax

    device = jax.devices()[0]
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
             "pydensecrf")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"platform": device.platform, "kind": device.device_kind,
            "count": jax.device_count(), "versions": versions}


def _cam_child(args: dict) -> dict:
    """Seconds of multi-crop CAMs of one image (``units.time_cam``) and the first call's."""
    from bench import config_values, units

    size = units.Size(**args["size"])
    config = config_values.get_config("voc")
    config.compute_dtype = args["dtype"]
    config.cls.model.backbone.update(args.get("backbone", {}))
    config.cam.multicrop.scales = tuple(args["scales"])
    start = time.perf_counter()
    seconds = units.time_cam(config, size, args["repeats"])
    return {"s_per_image": seconds, "first_and_timed_s": time.perf_counter() - start,
            "scales": list(args["scales"]), "dtype": args["dtype"],
            "image": [size.px(375), size.px(500)], "crop": size.px(config.cam.multicrop.crop)}


def _pseudo_jax_child(args: dict) -> dict:
    from bench import pseudo_masks

    return pseudo_masks.jax_row(args["count"], args["official"])


# --------------------------------------------------------------------------------------------
# Rows


def _settings(device: Device, quick: bool) -> str:
    return "quick" if quick else "accelerator" if device.accelerator else "cpu"


# argv of the step benchmarks per setting. PyTorch's first two steps on a CPU are 10-50x slower
# than the rest (lazy initialisation, optimiser state): at least two warm-up steps.
STEP_SIZES = {
    "classifier": {"quick": ["--width_div=32", "--blocks=1,1,1,1", "--crop=32", "--batch=4",
                             "--warmup=3", "--steps=3"],
                   "cpu": ["--crop=128", "--batch=2", "--warmup=2", "--steps=3"],
                   "accelerator": ["--gpu"]},
    "segmenter": {"quick": ["--width_div=16", "--blocks=1,1,1,1", "--crop=32", "--batch=4",
                            "--warmup=3", "--steps=3"],
                  "cpu": ["--width_div=4", "--blocks=1,1,2,1", "--crop=128", "--batch=4",
                          "--warmup=2", "--steps=3"],
                  "accelerator": ["--warmup=3", "--steps=10"]},
}


def step_row(model: str, dtype: str, remat: bool | None = None) -> Callable[[Device, bool], dict]:
    """A train-step row: ``model`` "seam", "plain" or "pspnet"; ``dtype`` "config" (the
    configs' precision on the device) or "float32"; ``remat`` (None: configs/voc.py's)."""
    def run(device: Device, quick: bool) -> dict:
        from bench import classifier_step, config_values, segmenter_step, step_report

        configured = config_values.get_config("voc").cls.model.remat
        remat_on = configured if remat is None else remat
        precision = device.config_dtype if dtype == "config" else dtype
        if model == "pspnet":
            bench, argv = segmenter_step, []
        else:
            bench, argv = classifier_step, [f"--method={model}"]
        kind = "segmenter" if model == "pspnet" else "classifier"
        argv += STEP_SIZES[kind][_settings(device, quick)] + [f"--dtype={precision}"]
        args = bench.parse_args(argv + (["--remat"] if remat_on else []))
        figures = {"jax": step_report.in_child(bench.run_jax, args),
                   "settings": {k: getattr(args, k) for k in ("crop", "batch", "warmup", "steps",
                                                             "width_div", "blocks", "dtype",
                                                             "remat")}}
        figures["jax"]["loss_finite"] = math.isfinite(figures["jax"]["last_loss"])
        if remat_on != configured:  # PyTorch has no remat: the base row's figures are its comparator
            figures["torch_from"] = model
        elif importlib.util.find_spec("torch") is None:
            figures["torch_skipped"] = "torch is not installed"
        else:
            figures["torch"] = step_report.in_child(bench.run_torch, args)
            figures["torch"]["loss_finite"] = math.isfinite(figures["torch"]["last_loss"])
        if not figures["jax"]["loss_finite"]:
            raise FloatingPointError(f"non-finite JAX loss {figures['jax']['last_loss']}")
        return figures

    return run


def pseudo_masks_row(device: Device, quick: bool) -> dict:
    from bench import pseudo_masks

    return pseudo_masks.pool_row(count=4 if quick else 20, rounds=1 if quick else 3)


def pseudo_masks_jax_row(device: Device, quick: bool) -> dict:
    from bench import step_report

    return step_report.in_child(_pseudo_jax_child, {
        "count": 2 if quick else 7,
        "official": importlib.util.find_spec("pydensecrf") is not None})


def cam_row(device: Device, quick: bool) -> dict:
    from bench import config_values, step_report

    settings = _settings(device, quick)
    scales = tuple(config_values.get_config("voc").cam.multicrop.scales)
    args = {"dtype": device.config_dtype, "repeats": 1 if quick else 2,
            "scales": scales[:2] if quick else scales,
            "size": {"width_div": 1, "res_div": 1, "shallow": False}}
    if settings != "accelerator":  # a CPU: the network and image shrunk
        args["size"] = ({"width_div": 32, "res_div": 8, "shallow": True} if quick
                        else {"width_div": 4, "res_div": 2, "shallow": True})
    return step_report.in_child(_cam_child, args)


def compile_row(program: str, target: str, dtype: str = "bfloat16",
                pod: bool = False) -> Callable[[Device, bool], dict]:
    """A compile-table row (``bench/compile_table.py``): ``program`` compiled for ``target``
    (no such device needed), remat on (configs/voc.py's); ``--quick``: tiny widths."""
    def run(device: Device, quick: bool) -> dict:
        from bench import compile_table

        result = compile_table.run_row(program, target, dtype=dtype, remat=True,
                                       quick=quick, pod=pod)
        if result["status"] != "ok":
            raise RuntimeError(result.get("reason") or result.get("error"))
        return result["figures"]

    return run


def compile_rows() -> list[Row]:
    """Every program of the compile table on v5e:2x4 (2 hosts) in the configs' precision;
    the SEAM and PSPNet ResNetV1c-101 steps also on every other target, in float32 on
    v5e:2x4, and on the v5e:8x8 pod with ``configs/voc.py:pod64``. Names:
    ``compile:<program>@<target>[/f32][/pod]``."""
    from bench import compile_table as ct

    plan = [(p, "v5e:2x4", "bfloat16", False) for p in ct.PROGRAMS]
    for program in ("pspnet_r101_ce", "seam"):
        plan += [(program, t, "bfloat16", False) for t in ct.TARGETS
                 if t not in ("v5e:2x4", "v5e:8x8")]
        plan += [(program, "v5e:8x8", "bfloat16", True), (program, "v5e:2x4", "float32", False)]
    rows = []
    for program, target, dtype, pod in plan:
        needs = ("jax_cuda12_plugin",) if target in ct.GPU_TARGETS else ("libtpu",)
        rows.append(Row("compile:" + ct.row_name(program, target, dtype, True, pod),
                        f"{ct.PROGRAMS[program]['what']}, compiled for {target} ({dtype})",
                        compile_row(program, target, dtype, pod), (60, 900, 900),
                        needs=needs + ("ml_collections",)))
    return rows
def photo_predict_row(device: Device, quick: bool) -> dict:
    """``bench/photo_predict.py``: predict and export.load on one 12 MP photo (512x512 canvas)
    against PIL's resize + the model alone; the network shrunk off an accelerator."""
    from bench import step_report

    settings = _settings(device, quick)
    args = {"quick": {"width_div": 16, "blocks": "1,1,1,1", "repeats": 1},
            "cpu": {"width_div": 4, "blocks": "1,1,2,1", "repeats": 2},
            "accelerator": {"width_div": 1, "blocks": "3,4,23,3", "repeats": 3}}[settings]
    args.update(scales=(1.0,), flip=False, sliding_window=None)
    return step_report.in_child(_photo_predict_child, args)


def _photo_predict_child(args: dict) -> dict:
    from bench import photo_predict

    return photo_predict.run(args)


ROWS = [
    Row("seam", "SEAM classifier step as configured (precision, remat)",
        step_row("seam", "config"), (40, 300, 150)),
    Row("pspnet", "PSPNet step (the seg stage's) as configured", step_row("pspnet", "config"),
        (30, 200, 150)),
    Row("plain", "plain classifier step as configured", step_row("plain", "config"),
        (30, 200, 120)),
    Row("seam_no_remat", "SEAM classifier step, configs' precision, no remat",
        step_row("seam", "config", remat=False), (25, 200, 100)),
    Row("pspnet_no_remat", "PSPNet step, configs' precision, no remat",
        step_row("pspnet", "config", remat=False), (20, 150, 100)),
    Row("seam_f32", "SEAM classifier step, float32", step_row("seam", "float32"),
        (40, 300, 150)),
    Row("pspnet_f32", "PSPNet step, float32", step_row("pspnet", "float32"), (30, 200, 150)),
    Row("plain_f32", "plain classifier step, float32", step_row("plain", "float32"),
        (30, 200, 120)),
    Row("pseudo_masks", "pseudo-mask generator (pydensecrf pool) vs the official loop",
        pseudo_masks_row, (15, 120, 120), needs=("pydensecrf", "ml_collections", "absl", "tqdm")),
    Row("pseudo_masks_jax", "pseudo-masks with the JAX dense CRF, per image",
        pseudo_masks_jax_row, (40, 120, 90), needs=("scipy", "PIL", "ml_collections", "tqdm")),
    Row("cam", "multi-crop CAMs of one image at configs/voc.py's scales", cam_row,
        (30, 200, 120)),
    *compile_rows(),
    Row("photo_predict", "predict and export.load of a 12 MP photo (512x512 canvas) vs PIL "
        "resize + the model alone", photo_predict_row, (60, 120, 90), needs=("PIL",)),
]


# --------------------------------------------------------------------------------------------
# Running


def skip_reason(row: Row, device: Device) -> str | None:
    """Why ``row`` is not run on this device (None: it runs)."""
    missing = [m for m in row.needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (not installed)"
    if row.name.endswith("_f32") and device.config_dtype == "float32":
        return f"the configs' precision on {device.platform} is float32: see {row.name[:-4]}"
    return None


def run_rows(rows: list[Row], device: Device, quick: bool, budget_s: float | None) -> dict:
    """``{name: {"status", "seconds", "figures" | "error" | "reason"}}`` in row order."""
    column = 0 if quick else 2 if device.accelerator else 1
    results, start = {}, time.perf_counter()
    for row in rows:
        elapsed = time.perf_counter() - start
        reason = skip_reason(row, device)
        if reason is None and budget_s is not None and elapsed + row.estimate_s[column] > budget_s:
            reason = (f"budget: {elapsed:.0f} s used, about {row.estimate_s[column]:.0f} s more "
                      f"would pass --budget_s={budget_s:.0f}")
        if reason is not None:
            results[row.name] = {"status": "skipped", "reason": reason, "what": row.what}
            print(f"suite: {row.name}: skipped ({reason})", file=sys.stderr, flush=True)
            continue
        print(f"suite: {row.name}: {row.what} ...", file=sys.stderr, flush=True)
        row_start = time.perf_counter()
        try:
            result = {"status": "ok", "figures": row.run(device, quick)}
        except Exception as err:  # noqa: BLE001 - a failing row is reported, the suite goes on
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-3000:]}
        result.update(what=row.what, seconds=time.perf_counter() - row_start)
        results[row.name] = result
        print(f"suite: {row.name}: {result['status']} in {result['seconds']:.0f} s"
              + (f": {result['error']}" if "error" in result else ""), file=sys.stderr, flush=True)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="small shapes of every row")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="start no row that would take the run past this many seconds")
    parser.add_argument("--only", default="",
                        help="comma-separated row names (default all): " + ",".join(r.name for r in ROWS))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from bench import step_report
    from bench.suite_report import markdown

    args = parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        raise SystemExit(f"error: unknown row(s) {unknown}; rows: {[r.name for r in ROWS]}")
    if args.only and not names:
        raise SystemExit(f"error: --only={args.only} names no row; name one or more of "
                         f"{','.join(r.name for r in ROWS)}, or leave --only out for all")
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise SystemExit(f"error: --budget_s={args.budget_s} must be a positive number of "
                         "seconds (or left out: no budget)")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"error: --out={args.out} is a file, not a folder; name a folder "
                         "(created when absent) for results.json and results.md")
    try:
        os.makedirs(args.out, exist_ok=True)  # before any row: its figures would be lost
    except OSError as err:
        raise SystemExit(f"error: --out={args.out}: cannot create the folder ({err})") from None
    rows = [r for r in ROWS if not names or r.name in names]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    device = Device(**step_report.in_child(device_info, None))
    results = run_rows(rows, device, args.quick, args.budget_s)
    report = {
        "command": " ".join(["python -m bench.suite", *(argv if argv is not None else sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "quick": args.quick, "budget_s": args.budget_s,
        "device": dataclasses.asdict(device) | {"config_dtype": device.config_dtype},
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "load": {"before": load_before, "after": os.getloadavg()},
        "rows": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
