"""Pseudo-mask generation from CAMs (PMM section 3.1-3.3) and rough masks: scheduling.

Every method (``worker.METHODS``: the paper's four variants and the rough masks of multi-crop
training, described in ``pmm_jax.masks.worker``) goes through ``generate``: one pool, one
skip/resume logic, one error report.

Pipeline. The main process walks the records, skips ids whose PNG exists, and hands each
remaining image whole to ``worker.run`` in a pool of ``num_workers - 1`` ``spawn``-ed
processes (pydensecrf backend, ``num_workers`` > 1), at most 2 images per pool process in
flight; whenever that queue is full it makes the next image itself, so it is the N-th
worker and works while the others start. A worker reads the image and CAM files itself (pass
paths: a task then pickles a few bytes), computes the mask in numpy, runs the image's dense
CRFs one after the other and writes the PNG atomically (``safe_io.write_mask``), so a killed run leaves only complete PNGs and a rerun
skips them. Workers import numpy, pydensecrf and ``pmm_jax.masks.worker``, never JAX, and
start in a fraction of a second. A ``spawn`` child also re-imports the parent's ``__main__``
module, so this module imports JAX lazily (it is imported by ``__main__`` under the CLI); a
script calling ``generate`` should do the same, or its workers load JAX too, and needs the
usual ``if __name__ == "__main__"`` guard.

With one worker, or the jax CRF backend (``cfg.crf.backend = "jax"``), there is no pool: the
main process runs ``worker.run`` itself, with ``dense_crf_jax.dense_crf_padded`` as the CRF
for the jax backend (PPMG: all per-class binary CRFs of the image as label sets of one
lattice, their number padded to a power of two; joint variants: one CRF over exactly the
image's ``[background, classes]``), on the image padded to a ``PAD_MULTIPLE`` bucket, so the
CRF compiles once per bucket and label-set shape.

With a pool the main process only schedules: it never runs the jitted core, and records
given as paths reach the workers as paths, not arrays (docs/benchmarks.md has the figures
against the official one-process loop).

Why not ``Pool.imap``: its feeder thread drains the input iterator eagerly, which would hold
every image of the split in memory; ``concurrent.futures.ProcessPoolExecutor`` with an
explicit window keeps memory bounded and turns a crashed worker into ``BrokenProcessPool``
instead of a hang.

Errors. A bad record (unreadable image or CAM file, CAM with NaN/inf, CAM size != image
size, class index outside ``0..num_classes-2`` or not an integer, no image), a CRF that
raises or a mask that cannot be written fails only that image: the run goes on, and after
the pool has drained ``generate`` raises :class:`PseudoMaskError` listing every failed id
with its cause (``err.stats`` holds the counts); the CLI prints the counts and exits with
status 1. An ``out_dir`` that cannot be created or written is a ValueError before any work.
CAM files are read by ``safe_io.read_cams``, which never runs code from a file. An image whose
CAM dict is empty (no foreground class) gets an all-background mask; that is documented
behaviour, not an error. The CLI is ``python -m pmm_jax.pseudo_masks``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pmm_jax.files import safe_io
from pmm_jax.masks import worker
from pmm_jax.masks.dense_crf import (DEFAULT_BACKEND, PSEUDO_MASK_CRF, backend_and_params,
                                      process_pool)
from pmm_jax.masks.worker import METHODS

# Height and width are padded up to a multiple of this for the jax CRF; most VOC images fall
# in three buckets (384 x 512, 512 x 384, 512 x 512).
PAD_MULTIPLE = 64


class PseudoMaskError(ValueError):
    """Some images failed; ``failures`` is ``[(id, cause)]`` and ``stats`` the run's counts."""

    def __init__(self, failures: Sequence[tuple[str, str]], stats: dict):
        self.failures = list(failures)
        self.stats = stats
        shown = [f"  {image_id}: {cause}" for image_id, cause in self.failures[:50]]
        if len(self.failures) > 50:
            shown.append(f"  ... and {len(self.failures) - 50} more")
        super().__init__(f"{len(self.failures)} image(s) failed (masks of the others were "
                         "written):\n" + "\n".join(shown))


def default_config(method: str = "ppmg"):
    """The paper's settings: PPMG, t 0.05, s 0.3, the official CRF, VOC's 21 classes.

    ``alpha`` None is the method's own (11, rough masks 24). ``crf`` holds the ``CRFParams``
    fields and ``backend`` (``"pydensecrf"`` or ``"jax"``).
    """
    from ml_collections import config_dict  # not at import: bench.suite runs without it

    cfg = config_dict.ConfigDict()
    cfg.method = method
    cfg.alpha = config_dict.placeholder(float)
    cfg.t = 0.05
    cfg.s = 0.3
    cfg.official_minmax = False
    cfg.num_classes = 21
    cfg.crf = config_dict.ConfigDict(dict(backend=DEFAULT_BACKEND,
                                          **dataclasses.asdict(PSEUDO_MASK_CRF)))
    cfg.num_workers = config_dict.placeholder(int)
    return cfg


def generate(records: Iterable[tuple[str, Any, Any]], out_dir: str, cfg, *,
             num_workers: int | None = None, process_index: int | None = None,
             process_count: int | None = None, total: int | None = None) -> dict:
    """Writes ``out_dir/<id>.png`` (palette PNG, values 0..C; rough: 255 too) for every
    record of this process.

    ``cfg``: a ``default_config()`` ConfigDict. ``records`` yields ``(image_id, image,
    cams)``: ``image`` is a uint8 ``[H, W, 3]`` array or an image file path; ``cams`` is
    ``{0-based class: [H, W] float}`` or a CAM file path (``safe_io.read_cams``). Files are read
    by the worker that makes the mask, so pass paths to make resuming, sharding and the pool
    cheap. Process ``i`` of ``n`` (defaults: JAX's process index and count) handles records
    ``i, i + n, ...``; ids whose PNG exists are skipped. ``num_workers`` (else
    ``cfg.num_workers``, else every available core) processes make masks for the
    pydensecrf backend, this one included; 1 and the jax backend run only in this process.
    ``total``: number of records, for the progress bar (else ``len(records)``).

    Returns ``{"written", "skipped", "failed", "seconds", "images_per_s",
    "main_cpu_seconds"}``; the last is the CPU time of this process (all threads, the masks
    it made itself included). Raises :class:`PseudoMaskError` after the pool has drained if
    any image failed.
    """
    from tqdm import tqdm

    settings = settings_of(cfg)
    _check_out_dir(out_dir)
    safe_io.remove_stale_temps(out_dir)
    workers = num_workers if num_workers is not None else cfg.get("num_workers")
    workers = workers if workers is not None else _available_cores()
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {workers}")
    use_pool = settings.backend == "pydensecrf" and workers > 1
    crfs = worker.host_crfs if settings.backend == "pydensecrf" else jax_crfs
    index, count = _process_shard(process_index, process_count)
    if total is None and hasattr(records, "__len__"):
        total = len(records)
    shard_total = len(range(index, total, count)) if total is not None else None

    counts = collections.Counter()
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=shard_total, unit="img", desc=f"masks {settings.method}",
               dynamic_ncols=True, smoothing=0.1)

    def done(image_id: str, cause: str | None) -> None:
        if cause is None:
            counts["written"] += 1
        else:
            failures.append((image_id, cause))
            counts["failed"] += 1
            bar.write(f"pseudo-masks: {image_id} failed: {cause}", file=sys.stderr)
        bar.set_postfix(counts, refresh=False)
        bar.update()

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    # This process is one of the workers: it starts the others and makes an image itself
    # whenever their queue holds 2 images per worker. The pool's workers exit when we die.
    pool = process_pool(workers - 1) if use_pool else None
    window = 2 * (workers - 1)
    in_flight: dict[concurrent.futures.Future, str] = {}

    def collect(block: bool) -> None:
        if block:
            concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in [f for f in in_flight if f.done()]:
            try:
                cause = future.result()
            except BrokenProcessPool:
                raise
            except Exception as err:  # noqa: BLE001 - e.g. a record that cannot be pickled
                cause = worker.error_text(err)
            done(in_flight.pop(future), cause)

    try:
        for record, out_path in _todo(records, out_dir, index, count, done, counts):
            image_id = str(record[0])
            if pool is not None:
                collect(block=False)
                if len(in_flight) < window:
                    in_flight[pool.submit(worker.run, record, out_path, settings)] = image_id
                    continue
            done(image_id, worker.run(record, out_path, settings, crfs))
        while in_flight:
            collect(block=True)
    finally:
        # On an interrupt, queued CRFs are dropped rather than run to completion.
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    seconds = time.perf_counter() - start_wall
    stats = {
        "written": counts["written"], "skipped": counts["skipped"], "failed": counts["failed"],
        "seconds": seconds, "images_per_s": counts["written"] / seconds if seconds else 0.0,
        "main_cpu_seconds": time.process_time() - start_cpu,
    }
    if failures:
        raise PseudoMaskError(failures, stats)
    return stats


def _todo(records, out_dir: str, index: int, count: int, done, counts) -> Iterator[tuple]:
    """``(record, out_path)`` of this process's records still to make; an existing PNG is
    counted as skipped, an unusable id as failed."""
    for record in itertools.islice(records, index, None, count):
        image_id = str(record[0])
        if not image_id or os.sep in image_id or image_id in (".", ".."):
            done(image_id, f"invalid image id {image_id!r}")
            continue
        out_path = os.path.join(out_dir, f"{image_id}.png")
        if os.path.exists(out_path):
            counts["skipped"] += 1
            continue
        yield (image_id, *record[1:]), out_path


def dataset_records(examples: Iterable[dict], cam_dir: str) -> Iterator[tuple[str, Any, str]]:
    """``(id, image, cam path)`` of dataset examples (``{"id", "image"}`` dicts) whose CAM is
    ``cam_dir/<id>.npy``; a missing CAM file is a FileNotFoundError naming it, raised when its
    example is reached (masks written so far stay, a rerun resumes)."""
    for ex in examples:
        cam_path = os.path.join(cam_dir, f"{ex['id']}.npy")
        if not os.path.exists(cam_path):
            raise FileNotFoundError(f"no CAM file {cam_path} for training image {ex['id']!r}: "
                                    "run the 'cam' stage of that workdir first")
        yield ex["id"], ex["image"], cam_path


# --------------------------------------------------------------------------------------------
# Settings, sharding, the jax CRFs


def settings_of(cfg) -> worker.Settings:
    """The validated ``worker.Settings`` of a generator config; a ValueError names the key."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown pseudo-mask method {cfg.method!r}; expected one of {METHODS}")
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes counts background and must be >= 2, got {cfg.num_classes}")
    alpha = cfg.alpha if cfg.alpha is not None else worker.DEFAULT_ALPHA.get(
        cfg.method, worker.PAPER_ALPHA)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    backend, params = backend_and_params(cfg.crf)
    return worker.Settings(cfg.method, float(alpha), float(cfg.t), float(cfg.s),
                           bool(cfg.official_minmax), int(cfg.num_classes) - 1, params, backend)


def _check_out_dir(out_dir: str) -> None:
    """Creates ``out_dir`` and writes a probe file in it; a ValueError naming it if either
    fails (a file in the way, a read-only folder), before any image is read."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ValueError(f"out_dir {out_dir}: cannot write pseudo-masks there "
                         f"({type(err).__name__}: {err.strerror or err})") from err


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _process_shard(index: int | None, count: int | None) -> tuple[int, int]:
    """``(index, count)`` of this process, defaulting to JAX's multi-process layout."""
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index {index} must lie in [0, process_count={count})")
    return index, count


def jax_crfs(image: np.ndarray, label_sets: Sequence[np.ndarray], params) -> list[np.ndarray]:
    """The image's CRFs through ``dense_crf_jax`` in this process, as ``worker.host_crfs``
    returns them: the label sets (all of one size) as one lattice's batch, their number
    padded to a power of two with all-background sets (each set is an independent CRF), the
    image padded to the ``PAD_MULTIPLE`` bucket."""
    from pmm_jax.masks import dense_crf_jax

    count = len(label_sets)
    sets = np.stack(label_sets)
    bucket = 1 << (count - 1).bit_length()
    if bucket > count:
        filler = np.zeros((bucket - count, *sets.shape[1:]), np.float32)
        filler[:, 0] = 1.0
        sets = np.concatenate([sets, filler])
    return list(dense_crf_jax.dense_crf_padded(image, sets, params, multiple=PAD_MULTIPLE)[:count])
