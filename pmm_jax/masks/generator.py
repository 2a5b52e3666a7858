"""Pseudo-mask generation from CAMs (PMM section 3.1-3.3) and rough masks: scheduling.

Every variant (``masks/variants.py``: the paper's four variants, the rough masks of multi-crop
training and any registered one) goes through ``generate``: one pool, one skip/resume logic,
one error report.

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

With one worker there is no pool: the main process runs ``worker.run`` itself. With the jax
CRF backend (``cfg.crf.backend = "jax"``) the main process reads and checks the records
(``worker.load``), groups them by shape bucket (``device.bucket``), and runs each group's
whole path, normalisation to labels, jitted on the device
(``device.run_batch``, up to ``device_batch`` images per call); it decodes the label
indices and writes the PNGs.

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
from pmm_jax.masks.variants import VARIANTS

# Loaded images the jax backend holds at most while it waits for full device batches, as a
# multiple of the batch size.
HELD_BATCHES = 4


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
    # jax backend: images per device call; None = 4 on an accelerator, 1 on a CPU (where XLA
    # already spreads one image over every core and padding a batch only adds work).
    cfg.device_batch = config_dict.placeholder(int)
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
        todo = _todo(records, out_dir, index, count, done, counts)
        if settings.backend == "jax":
            _device_masks(todo, settings, done, cfg.get("device_batch"))
        else:
            for record, out_path in todo:
                image_id = str(record[0])
                if pool is not None:
                    collect(block=False)
                    if len(in_flight) < window:
                        in_flight[pool.submit(worker.run, record, out_path, settings)] = image_id
                        continue
                done(image_id, worker.run(record, out_path, settings))
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
    """The validated ``worker.Settings`` of a generator config; a ValueError names the key
    (an unknown method lists the registered variants)."""
    variant = VARIANTS.get(cfg.method)
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes counts background and must be >= 2, got {cfg.num_classes}")
    alpha = cfg.alpha if cfg.alpha is not None else variant.alpha
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    backend, params = backend_and_params(cfg.crf)
    return worker.Settings(method=cfg.method, variant=variant, alpha=float(alpha),
                           t=float(cfg.t), s=float(cfg.s),
                           official_minmax=bool(cfg.official_minmax),
                           num_foreground=int(cfg.num_classes) - 1, crf=params, backend=backend)


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


def _device_masks(todo, settings: worker.Settings, done, batch_size: int | None) -> None:
    """The jax backend: every record of ``todo`` loaded here, grouped by ``device.bucket``,
    each group's labels computed by ``device.run_batch`` (``batch_size`` images per call,
    else 4 on an accelerator and 1 on a CPU), decoded and written. A bad record fails alone;
    a failed device call fails its group's images."""
    import jax

    from pmm_jax.masks import device

    if batch_size is None:
        batch_size = 1 if jax.default_backend() == "cpu" else 4
    if batch_size < 1:
        raise ValueError(f"device_batch must be >= 1, got {batch_size}")
    groups: dict[tuple, list] = {}

    def flush(key) -> None:
        group = groups.pop(key)
        try:
            labels = device.run_batch([g[2] for g in group], [g[3] for g in group], settings,
                                      batch_size)
        except Exception as err:  # noqa: BLE001 - e.g. a lattice overflow fails its images
            for image_id, *_ in group:
                done(image_id, worker.error_text(err))
            return
        for (image_id, out_path, _, _, lookup), indices in zip(group, labels):
            done(image_id, worker.write(out_path, lookup[indices]))

    for record, out_path in todo:
        image_id = str(record[0])
        try:
            image, classes, cams = worker.load(record, settings)
        except Exception as err:  # noqa: BLE001 - a bad file fails only its image
            done(image_id, worker.error_text(err))
            continue
        if not classes:
            done(image_id, worker.write(out_path, np.zeros(image.shape[:2], np.uint8)))
            continue
        key = device.bucket(*image.shape[:2], len(classes), settings.variant)
        groups.setdefault(key, []).append(
            (image_id, out_path, image, np.stack(cams), worker.lookup(classes)))
        if len(groups[key]) == batch_size:
            flush(key)
        elif sum(map(len, groups.values())) >= HELD_BATCHES * batch_size:
            flush(max(groups, key=lambda k: len(groups[k])))
    for key in list(groups):
        flush(key)
