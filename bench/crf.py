"""Benchmark: pydensecrf (host) against the JAX dense CRF (``pmm_jax.masks.dense_crf_jax``) per image.

Three workloads on the real VOC photographs (``../shared/data/voc_samples`` by default):

* ``2-label``: one binary CRF ``[(1 - x) ** 11, x]`` (a pseudo-mask CRF);
* ``PPMG x3``: three binary CRFs of one image (its present classes, topped up to three),
  pydensecrf one after the other, JAX as one batched filter pass (``dense_crf_batched``);
* ``21-label``: one CRF over the 21 VOC labels (segmentation test time).

Columns, all seconds per image: pydensecrf on one core; pydensecrf in a process pool on all
cores (throughput; both one run); JAX one image per call (``dense_crf_batched``, host numpy
in and out, after compilation); JAX all images in one padded call (``dense_crf_images``, per
image); JAX first pass (compilation included). Also the argmax agreement with pydensecrf.
JAX runs on its default device (a GPU when present). Usage::

    python -m bench.crf [--samples DIR] [--params pseudo|test] [--repeats 3] [--json out.json]
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import platform
import time

import jax
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bench import config_values
from pmm_jax.masks import dense_crf, dense_crf_jax

DEFAULT_SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_samples"
PARAMS = {"pseudo": dense_crf.PSEUDO_MASK_CRF, "test": dense_crf.SEGMENTATION_TEST_CRF}
ALPHA = config_values.get_config("voc").pseudo.alpha  # the background power of the masks


def load_samples(directory):
    """``[(id, image uint8 [H, W, 3], label [H, W])]`` of the VOC sample folder."""
    samples = []
    for path in sorted(pathlib.Path(directory).glob("*_label.png")):
        image_id = path.name[:-len("_label.png")]
        image = np.asarray(Image.open(path.with_name(image_id + ".png")).convert("RGB"))
        samples.append((image_id, image, np.asarray(Image.open(path))))
    if not samples:
        raise SystemExit(f"no VOC samples in {directory}")
    return samples


def soft_maps(label, classes, seed):
    """CAM-like scores in [0, 1] ``[len(classes), H, W]``: blurred class masks plus smooth noise."""
    rng = np.random.default_rng(seed)
    maps = []
    for c in classes:
        mask = gaussian_filter((label == c).astype(np.float32), 6)
        noise = gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 4)
        maps.append(np.clip(mask + 0.5 * noise, 0.0, 1.0))
    return np.stack(maps).astype(np.float32)


def workloads(label, seed):
    """The three workloads' probabilities: ``{name: [S, L, H, W]}``."""
    present = [c for c in np.unique(label) if c != 0]
    classes = (present + [c for c in range(1, 21) if c not in present])[:3]
    x = soft_maps(label, classes, seed)
    binary = np.stack([(1.0 - x) ** ALPHA, x], axis=1)
    scores = soft_maps(label, range(21), seed) + 0.05
    return {"2-label": binary[:1], "PPMG x3": binary,
            "21-label": (scores / scores.sum(0, keepdims=True))[None]}


def host_crf(job):
    """pydensecrf on one image: every label set in turn (a pool worker)."""
    image, probs, params = job
    return np.stack([dense_crf.dense_crf(image, p, params) for p in probs])


def timed(fn, repeats):
    """(result, mean seconds of ``repeats`` calls)."""
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return result, (time.perf_counter() - start) / repeats


def bench_workload(samples, name, params, repeats, pool):
    """One table row: per-image seconds of every column and the argmax agreement."""
    jobs = [(image, workloads(label, i)[name], params)
            for i, (_, image, label) in enumerate(samples)]
    n = len(jobs)

    # pydensecrf's timing is steady: one run each.
    references, host = zip(*(timed(lambda j=j: host_crf(j), 1) for j in jobs))
    _, pool_total = timed(lambda: pool.map(host_crf, jobs), 1)

    start = time.perf_counter()
    for image, probs, _ in jobs:
        dense_crf_jax.dense_crf_batched(image, probs, params)
    first = (time.perf_counter() - start) / n
    outputs, device = zip(*(timed(lambda im=im, p=p: dense_crf_jax.dense_crf_batched(im, p, params),
                                  repeats) for im, p, _ in jobs))

    images, probs = [j[0] for j in jobs], [j[1] for j in jobs]
    dense_crf_jax.dense_crf_images(images, probs, params)
    _, batched_total = timed(lambda: dense_crf_jax.dense_crf_images(images, probs, params), repeats)

    agree = [float((r.argmax(1) == o.argmax(1)).mean()) for r, o in zip(references, outputs)]
    mad = [float(np.abs(r - o).mean()) for r, o in zip(references, outputs)]
    return {"workload": name, "images": n, "pydensecrf_1core": float(np.mean(host)),
            "pydensecrf_pool": pool_total / n, "pool_workers": pool._processes,
            "jax_per_image": float(np.mean(device)), "jax_batched": batched_total / n,
            "jax_first_pass": first, "agreement_min": min(agree),
            "mean_abs_diff": float(np.mean(mad))}


HEADER = ("| workload | pydensecrf 1 core | pydensecrf pool | JAX per image | JAX batched "
          "| speed-up 1 core / JAX | JAX first pass | argmax agreement (min) | mean abs diff |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def markdown_row(r):
    """One result row as a Markdown table line."""
    best = min(r["jax_per_image"], r["jax_batched"])
    return (f"| {r['workload']} | {r['pydensecrf_1core']:.3f} s | {r['pydensecrf_pool']:.3f} s "
            f"({r['pool_workers']} procs) | {r['jax_per_image']:.4f} s | {r['jax_batched']:.4f} s "
            f"| {r['pydensecrf_1core'] / best:.1f}x | {r['jax_first_pass']:.1f} s "
            f"| {100 * r['agreement_min']:.2f} % | {r['mean_abs_diff']:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default=str(DEFAULT_SAMPLES))
    parser.add_argument("--params", choices=sorted(PARAMS), default="pseudo")
    parser.add_argument("--workloads", default="2-label,PPMG x3,21-label")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    samples = load_samples(args.samples)[:args.limit or None]
    device = jax.devices()[0]
    machine = (f"{os.cpu_count()}-core {platform.machine()} host; JAX {jax.__version__} on "
               f"{device.platform}: {device.device_kind}; params {args.params}; "
               f"{len(samples)} VOC images; {args.repeats} repeats")
    print(f"Machine: {machine}\n\n{HEADER}", flush=True)
    params = PARAMS[args.params]
    rows = []
    with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
        for name in args.workloads.split(","):
            rows.append(bench_workload(samples, name, params, args.repeats, pool))
            print(markdown_row(rows[-1]), flush=True)
            if args.json:
                pathlib.Path(args.json).write_text(
                    json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
