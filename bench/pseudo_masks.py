"""The pseudo-mask rows of ``bench.suite``: the generator against the official procedure.

Inputs: ``count`` VOC-sized photographs (``../shared/data/voc_samples``, cycled under new ids;
synthetic 375x500 scenes when absent) as ``<id>.jpg`` with CAM files ``<id>.npy`` derived from
their labels (blurred, uneven, non-negative, as a classifier's), in a temporary folder.

* ``pool``: ``python -m pmm_jax.pseudo_masks --method=ppmg --num_workers=N`` (N = every
  available core) as a command, start-up included, against :func:`official_loop` run the same
  way (``python -c``): a plain one-process numpy + pydensecrf loop of the official
  ``refine_cam.py`` that reads the same files and writes PNGs. ``rounds`` interleaved rounds;
  the best time of each is kept (other load on a shared machine only slows a run down). Also
  CPU seconds per image of every process of each command (start-up included; unlike wall
  time it barely moves with other load), the pixel agreement of the two sets of masks and
  the load average.
* ``jax``: ``generator.generate`` with ``crf.backend=jax`` in this process (the whole
  per-image path jitted), seconds per image after a first pass (compilation, reported too),
  and agreement with the official loop's masks when pydensecrf is there.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import config_values
from pmm_jax.files import safe_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_SAMPLES = os.path.join(os.path.dirname(REPO), "shared", "data", "voc_samples")
# The paper's settings (configs/voc.py's pseudo section): alpha, t, s.
_PSEUDO = config_values.get_config("voc").pseudo
ALPHA, T, S = _PSEUDO.alpha, _PSEUDO.t, _PSEUDO.s


def cams_from_labels(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Classifier-like CAMs for the classes of a label map (blurred, uneven, non-negative)."""
    from scipy.ndimage import gaussian_filter

    height, width = labels.shape
    yy, xx = np.mgrid[:height, :width]
    cams = {}
    for c in np.unique(labels):
        if c in (0, 255):
            continue
        mask = (labels == c).astype(np.float64)
        cy, cx = rng.choice(yy[labels == c]), rng.choice(xx[labels == c])
        peak = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.3 * max(height, width)) ** 2))
        cam = gaussian_filter(mask, 12) * rng.uniform(0.5, 3.0) * (0.4 + peak)
        cam += np.abs(rng.normal(0, 0.03, cam.shape)) * gaussian_filter(mask, 36)
        cams[int(c) - 1] = cam.astype(np.float32)
    return cams


def synthetic_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 375x500 scene of 1-3 coloured discs and its label map."""
    height, width = 375, 500
    yy, xx = np.mgrid[:height, :width]
    image = rng.normal(110, 25, (height, width, 3))
    labels = np.zeros((height, width), np.uint8)
    for c in rng.choice(20, size=rng.integers(1, 4), replace=False):
        cy, cx, r = rng.uniform(80, 300), rng.uniform(80, 420), rng.uniform(40, 120)
        shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        labels[shape] = c + 1
        image[shape] = rng.uniform(0, 255, 3) + rng.normal(0, 10, (shape.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_inputs(folder: str, count: int) -> str:
    """Writes ``folder/images/<id>.jpg`` and ``folder/cams/<id>.npy`` for ``count`` images;
    returns a description of the source."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if os.path.isdir(VOC_SAMPLES):
        ids = sorted(f[:-10] for f in os.listdir(VOC_SAMPLES) if f.endswith("_label.png"))
        samples = [(safe_io.read_image(os.path.join(VOC_SAMPLES, f"{i}.png")),
                    safe_io.read_mask(os.path.join(VOC_SAMPLES, f"{i}_label.png"))) for i in ids]
        source = f"{count} VOC photographs ({len(ids)} distinct, ../shared/data/voc_samples)"
    else:
        samples = [synthetic_sample(rng) for _ in range(7)]
        source = f"{count} synthetic 375x500 scenes (no ../shared/data/voc_samples)"
    for folder_name in ("images", "cams"):
        os.makedirs(os.path.join(folder, folder_name), exist_ok=True)
    for n in range(count):
        image, labels = samples[n % len(samples)]
        Image.fromarray(image).save(os.path.join(folder, "images", f"im{n:03d}.jpg"), quality=95)
        safe_io.write_cams(os.path.join(folder, "cams", f"im{n:03d}.npy"),
                           cams_from_labels(labels, rng))
    return source


def official_loop(image_dir: str, cam_dir: str, out_dir: str) -> None:
    """The official PPMG procedure (``refine_cam.py``), one image after the other in plain numpy
    with pydensecrf (``dense_crf.dense_crf`` is the official ``crf_inference``), files in and
    PNGs out."""
    from PIL import Image

    from pmm_jax.masks import dense_crf

    params = dense_crf.PSEUDO_MASK_CRF
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(cam_dir)):
        image_id = name[:-4]
        image = np.asarray(Image.open(os.path.join(image_dir, f"{image_id}.jpg")).convert("RGB"))
        cams = np.load(os.path.join(cam_dir, name), allow_pickle=True).item()
        keys = sorted(cams)
        background = np.ones(image.shape[:2])
        scores, labels = [], [0]
        fgs = []
        for k in keys:
            v = cams[k]
            v = (v - v.min()) / (v.max() - v.min() + 1e-5)
            above = v[v > T]
            cov = above.std() / (above + 1e-8).mean() * S if above.size else 0.0
            x = np.where(v < T, 0, v) ** (1 - cov)
            probs = np.stack([(1 - x) ** ALPHA, x]).astype(np.float32)
            fg = dense_crf.dense_crf(image, probs, params)[1] > 0.5
            fgs.append(fg)
            scores.append(v / (1 + (v * fg).sum()))
            labels.append(k + 1)
            background = background * (fg == 0)
        stacked = np.stack([background] + [fg * p for fg, p in zip(fgs, scores)])
        mask = np.asarray(labels, np.uint8)[np.argmax(stacked, axis=0)]
        Image.fromarray(mask).save(os.path.join(out_dir, f"{image_id}.png"))


def children_cpu() -> float:
    """CPU seconds of this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(args: list[str]) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of a Python command run from the repository root (CPU: the
    command and every process it started); RuntimeError with its stderr when it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    start, start_cpu = time.perf_counter(), children_cpu()
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {result.stderr[-2000:]}")
    return seconds, children_cpu() - start_cpu


def agreement(dir_a: str, dir_b: str) -> float:
    """Share of pixels on which the PNG masks of two folders agree."""
    same = total = 0
    for name in sorted(os.listdir(dir_a)):
        a = safe_io.read_mask(os.path.join(dir_a, name))
        b = safe_io.read_mask(os.path.join(dir_b, name))
        same += np.count_nonzero(a == b)
        total += a.size
    return same / total


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_row(count: int, rounds: int) -> dict:
    """The ``pool`` figures: seconds per image of both, speed-up, its target, agreement."""
    workers = available_cores()
    with tempfile.TemporaryDirectory() as root:
        source = write_inputs(root, count)
        images, cams = os.path.join(root, "images"), os.path.join(root, "cams")
        ours_dir, official_dir = os.path.join(root, "ours"), os.path.join(root, "official")
        official_cmd = ["-c", "import sys; from bench.pseudo_masks import official_loop; "
                        "official_loop(*sys.argv[1:])", images, cams, official_dir]
        ours_cmd = ["-m", "pmm_jax.pseudo_masks", f"--cam_dir={cams}", f"--image_dir={images}",
                    f"--out_dir={ours_dir}", "--method=ppmg", f"--num_workers={workers}"]
        official, ours, loads = [], [], []
        for _ in range(rounds):
            for folder in (ours_dir, official_dir):
                shutil.rmtree(folder, ignore_errors=True)
            official.append(timed_command(official_cmd))
            ours.append(timed_command(ours_cmd))
            loads.append(os.getloadavg()[0])
        share = agreement(official_dir, ours_dir)
    (best_official, official_cpu), (best_ours, ours_cpu) = min(official), min(ours)
    return {"source": source, "images": count, "workers": workers, "rounds": rounds,
            "official_s": [s for s, _ in official], "generator_s": [s for s, _ in ours],
            "official_cpu_s_per_image": official_cpu / count,
            "generator_cpu_s_per_image": ours_cpu / count,
            "official_s_per_image": best_official / count,
            "generator_s_per_image": best_ours / count,
            "speedup": best_official / best_ours, "target_speedup": 0.9 * workers,
            "meets_target": best_official / best_ours >= 0.9 * workers,
            "agreement": share, "load_1min": loads}


def jax_row(count: int, have_official: bool) -> dict:
    """The ``jax`` figures: per-image seconds of ``generator.generate`` with
    ``crf.backend=jax`` in this process (files in, PNG out: the whole per-image path on the
    device), after a first pass whose time includes compilation; agreement with the official
    loop."""
    from pmm_jax.masks import generator

    cfg = generator.default_config("ppmg")
    cfg.alpha, cfg.t, cfg.s, cfg.num_classes = ALPHA, T, S, 21
    cfg.crf.backend = "jax"
    with tempfile.TemporaryDirectory() as root:
        source = write_inputs(root, count)
        images, cams = os.path.join(root, "images"), os.path.join(root, "cams")
        records = [(n[:-4], os.path.join(images, n[:-4] + ".jpg"), os.path.join(cams, n))
                   for n in sorted(os.listdir(cams))]

        def run(out_dir: str) -> float:
            start = time.perf_counter()
            generator.generate(records, out_dir, cfg, process_index=0, process_count=1)
            return time.perf_counter() - start

        first, second = run(os.path.join(root, "first")), run(os.path.join(root, "ours"))
        share = None
        if have_official:
            official_loop(images, cams, os.path.join(root, "official"))
            share = agreement(os.path.join(root, "official"), os.path.join(root, "ours"))
    return {"source": source, "images": count, "first_pass_s": first,
            "s_per_image": second / count, "agreement": share}
