r"""Rough masks for PMM's multi-crop classifier training, made from a first run's CAMs.

PMM labels its multi-crop training tiles with rough masks from a first ResNet38 model: its
multi-scale CAMs of the train split, background ``(1 - max_c cam_c) ** 24``, one joint dense
CRF (the official ``infer_multi_scale.py --out_crf``, ``crf_threshs`` 24), and a class's rough
mask is where its CRF posterior exceeds 0.9 (``multicrop_tiling.ROUGH_MASK_THRESHOLD``). Run the first
model's ``cls`` and ``cam`` stages, then::

    python -m pmm_jax.masks.rough_masks --config=configs/voc.py --workdir=FIRST_RUN

which reads ``FIRST_RUN/cams/train/<id>.npy`` for every train image of the config's dataset
and writes ``FIRST_RUN/rough_masks/train/<id>.png`` (``--out_dir`` elsewhere): a label PNG
with c+1 where class c's posterior exceeds 0.9, 0 where the background's does, 255 elsewhere
(the official PNG "heat" format; only the values c+1 are used). Point the main run at it with
``--config.cls.multicrop.rough_masks=DIR`` (docs/multicrop_tiling.md). Existing files are skipped, so
an interrupted run resumes. ``--cam_dir`` reads CAM files (official format) from elsewhere.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from pmm_jax.cams import multicrop_tiling
from pmm_jax.files import io
from pmm_jax.masks import dense_crf

ALPHA = 24.0  # the official crf_threshs default used for the rough masks
UNLABELLED = 255


def rough_mask(image: np.ndarray, cams: dict[int, np.ndarray], alpha: float = ALPHA,
               params: dense_crf.CRFParams = dense_crf.PSEUDO_MASK_CRF) -> np.ndarray:
    """uint8 ``[H, W]``: c+1 where class c's joint-CRF posterior exceeds 0.9, 0 where the
    background's does, 255 elsewhere. ``cams``: ``{0-based class: [H, W] in [0, 1]}``."""
    height, width = image.shape[:2]
    if not cams:
        return np.zeros((height, width), np.uint8)  # no class: all background
    classes = sorted(cams)
    scores = np.stack([np.asarray(cams[c], np.float32) for c in classes])
    background = (1.0 - scores.max(axis=0, keepdims=True)) ** alpha
    posterior = dense_crf.dense_crf(image, np.concatenate([background, scores]), params)
    out = np.full((height, width), UNLABELLED, np.uint8)
    for value, prob in zip([0] + [c + 1 for c in classes], posterior):
        out[prob > multicrop_tiling.ROUGH_MASK_THRESHOLD] = value
    return out


def _work(job: tuple[str, np.ndarray, str, str, float]) -> str:
    image_id, image, cam_path, out_path, alpha = job
    cams = io.read_cams(cam_path)
    for c, cam in cams.items():
        if cam.shape != image.shape[:2]:
            raise ValueError(f"{cam_path}: class {c} CAM is {cam.shape[0]}x{cam.shape[1]} but "
                             f"the image is {image.shape[0]}x{image.shape[1]}")
    io.write_mask(out_path, rough_mask(image, cams, alpha))
    return image_id


def write_rough_masks(records: Iterable[tuple[str, np.ndarray]], cam_dir: str, out_dir: str, *,
                      alpha: float = ALPHA, num_workers: int = 1) -> int:
    """Writes ``out_dir/<id>.png`` for every ``(id, uint8 image)`` of ``records`` from
    ``cam_dir/<id>.npy``; skips existing files; returns how many were written.

    A missing CAM file raises FileNotFoundError naming it (masks written so far stay, so a
    rerun resumes). ``num_workers`` > 1 runs the CRFs in that many spawned processes (0 = all
    cores), a bounded number of images in flight.
    """
    os.makedirs(out_dir, exist_ok=True)
    io.remove_stale_temps(out_dir)

    def jobs() -> Iterator[tuple[str, np.ndarray, str, str, float]]:
        for image_id, image in records:
            out_path = os.path.join(out_dir, f"{image_id}.png")
            if os.path.exists(out_path):
                continue
            cam_path = os.path.join(cam_dir, f"{image_id}.npy")
            if not os.path.exists(cam_path):
                raise FileNotFoundError(
                    f"no CAM file {cam_path} for training image {image_id!r}: run the first "
                    "model's 'cam' stage first")
            yield image_id, np.asarray(image, np.uint8), cam_path, out_path, float(alpha)

    workers = num_workers or os.cpu_count() or 1
    if workers == 1:
        return sum(1 for job in jobs() if _work(job))
    written, pending = 0, jobs()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        while window := list(itertools.islice(pending, 8 * workers)):
            written += len(pool.map(_work, window, chunksize=2))
    return written


def _records(config, wd) -> Iterator[tuple[str, np.ndarray]]:
    from pmm_jax.stages import common

    for ex in common.examples(config, wd, "train", all_processes=True):
        yield ex["id"], ex["image"]


def _define_flags() -> None:
    """CLI flags; defined only when run as a script so importing this module adds none."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The first run's config file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "The first run's workdir (its cams/train).")
    flags.DEFINE_string("cam_dir", None, "CAM folder; default WORKDIR/cams/train.")
    flags.DEFINE_string("out_dir", None, "Output folder; default WORKDIR/rough_masks/train.")
    flags.DEFINE_float("alpha", ALPHA, "Background exponent: (1 - max cam) ** alpha.")
    flags.DEFINE_integer("num_workers", 0, "CRF processes (0 = all cores).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    import sys

    from absl import app, flags

    from pmm_jax.files.workdir import Workdir

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    wd = Workdir(f.workdir)
    cam_dir = f.cam_dir or wd.cams("train")
    out_dir = f.out_dir or os.path.join(wd.root, "rough_masks", "train")
    try:
        written = write_rough_masks(_records(f.config, wd), cam_dir, out_dir, alpha=f.alpha,
                                    num_workers=f.num_workers)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {written} rough masks to {out_dir}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
