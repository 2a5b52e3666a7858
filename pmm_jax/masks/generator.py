"""Pseudo-mask generation from CAMs (PMM section 3.1-3.3), CRFs in a process pool or in JAX.

Four variants (``cfg.method``), all on per-class min-max normalised CAMs ``x``:

* ``"baseline"``: background ``(1 - max_c x_c) ** alpha``; one joint dense CRF over
  ``[background, present classes]``; argmax (paper 3.1, "CRF" in Table 2).
* ``"crf_cvs"``: the baseline on CVS-smoothed CAMs (Table 2 "CRF & CVS").
* ``"ppmg_no_cvs"``: PPMG with ``x_s = x`` (Table 2 "PPMG w/o CVS").
* ``"ppmg"``: CVS, one binary dense CRF per present class on ``[(1 - x_s) ** alpha, x_s]``,
  ``fg_c = posterior_c > 0.5``, proportion on the UNSMOOTHED ``x``, PPMG argmax (the paper).

Pipeline. The main process reads records, validates them, runs the jitted core of
``pmm_jax.masks`` (normalise, CVS, CRF inputs) on arrays padded to a shape bucket so jit
compiles once per bucket, and submits one CRF task per present class (PPMG) or per image
(baseline) to a pool of ``spawn``-ed worker processes. The task function is
``pmm_jax.masks.dense_crf.dense_crf`` itself, so a worker imports numpy, pydensecrf and ``pmm_jax.masks.dense_crf``,
never JAX. A ``spawn`` child also re-imports the parent's ``__main__`` module, so this module
imports JAX lazily (it is ``__main__`` under the CLI); a script calling ``generate`` should do
the same, or its workers load JAX too, and needs the usual ``if __name__ == "__main__"``
guard. At most ``2 * workers + 1`` images are in flight; finished images are taken in
submission order, thresholded (posterior > 0.5) and labelled by the jitted core
(``ppmg_labels`` / ``argmax_labels``) and written atomically (``io.write_mask``), so a killed
run leaves only complete PNGs and a rerun skips them.

CRF backend (``cfg.crf.backend``, ``pmm_jax.masks.dense_crf.BACKENDS``). ``"pydensecrf"`` (default):
the process pool above. ``"jax"``: no pool; the main process runs each image's CRFs with
``pmm_jax.masks.dense_crf_jax.dense_crf_padded`` (PPMG: all per-class binary CRFs of the image as label
sets of one lattice, padded to the power-of-two class bucket; baseline: one joint CRF over
exactly the image's ``[background, classes]``), on the image padded to the same
``PAD_MULTIPLE`` bucket, so the CRF compiles once per bucket and label-set shape. Everything
else (validation, skipping, errors, atomic writes) is shared.

Why not ``Pool.imap``: its feeder thread drains the input iterator eagerly, which would hold
every image of the split in memory; ``concurrent.futures.ProcessPoolExecutor`` with an
explicit window keeps memory bounded and turns a crashed worker into ``BrokenProcessPool``
instead of a hang.

Errors. A bad record (unreadable image or CAM file, CAM with NaN/inf, CAM size != image
size, class index outside ``0..num_classes-2`` or not an integer, no image), any other
exception while preparing it, a CRF that raises or a mask that cannot be written fails only
that image: the run goes on, and after the pool has drained ``generate`` raises
:class:`PseudoMaskError` listing every failed id with its cause (``err.stats`` holds the
counts); the CLI prints the counts and exits with status 1. An ``out_dir`` that cannot be
created or written is a ValueError before any work. CAM files are read by ``io.read_cams``,
which never runs code from a file (a pickle naming anything but numpy's array
reconstruction fails that image). An image whose CAM dict is empty (no foreground class)
gets an all-background mask; that is documented behaviour, not an error.

CLI::

    python -m pmm_jax.pseudo_masks --cam_dir=CAMS --image_dir=IMAGES --out_dir=OUT \
        [--method=ppmg|baseline|crf_cvs|ppmg_no_cvs] [--num_workers=N] \
        [--config.crf.backend=pydensecrf|jax] \
        [--config.alpha=11 --config.t=0.05 --config.crf.bilateral_srgb=13 ...]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import sys
import tempfile
import time
import types
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from ml_collections import config_dict
from tqdm import tqdm

from pmm_jax.files import io
from pmm_jax.masks.dense_crf import (
    DEFAULT_BACKEND,
    PSEUDO_MASK_CRF,
    CRFParams,
    backend_and_params,
    dense_crf,
    process_pool,
)

METHODS = ("ppmg", "baseline", "crf_cvs", "ppmg_no_cvs")
# Variants that smooth the CAMs with CVS before the CRF.
_CVS_METHODS = ("ppmg", "crf_cvs")
# Variants that run one joint CRF per image and take its argmax.
_JOINT_METHODS = ("baseline", "crf_cvs")
# Height and width are padded up to a multiple of this before jit; most VOC images fall in
# three buckets (384 x 512, 512 x 384, 512 x 512).
PAD_MULTIPLE = 64
# Posterior above which a pixel is foreground in a binary CRF (official: crf_k > 0.5).
FG_THRESHOLD = 0.5


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


def default_config() -> config_dict.ConfigDict:
    """The paper's settings: PPMG, alpha 11, t 0.05, s 0.3, the official CRF, VOC's 21 classes.

    ``crf`` holds the ``CRFParams`` fields and ``backend`` (``"pydensecrf"`` or ``"jax"``).
    """
    cfg = config_dict.ConfigDict()
    cfg.method = "ppmg"
    cfg.alpha = 11.0
    cfg.t = 0.05
    cfg.s = 0.3
    cfg.official_minmax = False
    cfg.num_classes = 21
    cfg.crf = config_dict.ConfigDict(dict(backend=DEFAULT_BACKEND,
                                          **dataclasses.asdict(PSEUDO_MASK_CRF)))
    cfg.num_workers = config_dict.placeholder(int)
    return cfg


def generate(records: Iterable[tuple[str, Any, Any]], out_dir: str, cfg: config_dict.ConfigDict, *,
             num_workers: int | None = None, process_index: int | None = None,
             process_count: int | None = None, total: int | None = None) -> dict:
    """Writes ``out_dir/<id>.png`` (palette PNG, values 0..C) for every record of this process.

    ``records`` yields ``(image_id, image, cams)``: ``image`` is a uint8 ``[H, W, 3]`` array
    or an image file path; ``cams`` is ``{0-based class: [H, W] float}`` or a CAM file path
    (``io.read_cams``). Paths are read only for ids this process actually generates, so pass
    paths to make resuming and sharding cheap. Process ``i`` of ``n`` (defaults: JAX's
    process index and count) handles records ``i, i + n, ...``; ids whose PNG exists are
    skipped. ``num_workers`` (else ``cfg.num_workers``, else every available core) CRF
    processes for the pydensecrf backend (ignored by the jax backend, which runs the CRFs in
    this process). ``total``: number of records, for the progress bar (else ``len(records)``).

    Returns ``{"written", "skipped", "failed", "seconds", "images_per_s",
    "main_cpu_seconds"}``; the last is the CPU time of this process (all threads), i.e.
    the work done outside the CRF workers (with the jax backend, the CRFs too). Raises
    :class:`PseudoMaskError` after the pool has drained if any image failed.
    """
    settings = _settings(cfg)
    _check_out_dir(out_dir)
    io.remove_stale_temps(out_dir)
    workers = num_workers if num_workers is not None else cfg.get("num_workers")
    workers = workers if workers is not None else _available_cores()
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {workers}")
    use_pool = settings.backend == "pydensecrf"
    # Images prepared ahead of the one being finished: the pool's queue, none in-process.
    window = 2 * workers if use_pool else 0
    index, count = _process_shard(process_index, process_count)
    if total is None and hasattr(records, "__len__"):
        total = len(records)
    shard_total = len(range(index, total, count)) if total is not None else None

    counts = collections.Counter()
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=shard_total, unit="img", desc=f"pseudo-masks {settings.method}",
               dynamic_ncols=True, smoothing=0.1)

    def fail(image_id: str, cause: str) -> None:
        failures.append((image_id, cause))
        counts["failed"] += 1
        bar.write(f"pseudo-masks: {image_id} failed: {cause}", file=sys.stderr)
        bar.update()

    def finish(job: _Job) -> None:
        try:
            mask = _finalize(job, settings)
            io.write_mask(os.path.join(out_dir, f"{job.image_id}.png"), mask)
        except BrokenProcessPool:
            raise
        except Exception as err:  # noqa: BLE001 - a failing CRF or write fails only its image
            fail(job.image_id, f"{type(err).__name__}: {err}")
            return
        counts["written"] += 1
        bar.set_postfix(counts, refresh=False)
        bar.update()

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    pool = process_pool(workers) if use_pool else None  # its workers exit when we die
    in_flight: collections.deque[_Job] = collections.deque()
    try:
        for record in itertools.islice(records, index, None, count):
            image_id = str(record[0])
            try:
                done = os.path.exists(os.path.join(out_dir, f"{_checked_id(image_id)}.png"))
                job = None if done else _submit(pool, _prepare(record, settings), settings)
            except BrokenProcessPool:
                raise
            except (ValueError, TypeError, OSError) as err:
                fail(image_id, str(err))
                continue
            except Exception as err:  # noqa: BLE001 - e.g. an IndexError from a bad record
                fail(image_id, f"{type(err).__name__}: {err}")
                continue
            if job is None:
                counts["skipped"] += 1
                bar.update()
                continue
            in_flight.append(job)
            while len(in_flight) > window:
                finish(in_flight.popleft())
        while in_flight:
            finish(in_flight.popleft())
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


# --------------------------------------------------------------------------------------------
# Settings and sharding


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The validated config (``num_fg`` = number of foreground classes)."""

    method: str
    alpha: float
    t: float
    s: float
    official_minmax: bool
    num_fg: int
    crf: CRFParams
    backend: str                 # pmm_jax.masks.dense_crf.BACKENDS


def _settings(cfg: config_dict.ConfigDict) -> _Settings:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown pseudo-mask method {cfg.method!r}; expected one of {METHODS}")
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes counts background and must be >= 2, got {cfg.num_classes}")
    if not cfg.alpha > 0:
        raise ValueError(f"alpha must be > 0, got {cfg.alpha}")
    backend, params = backend_and_params(cfg.crf)
    return _Settings(cfg.method, float(cfg.alpha), float(cfg.t), float(cfg.s),
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


# --------------------------------------------------------------------------------------------
# Per-image steps: load and validate, jitted CRF inputs, CRF tasks, jitted labels, write


@dataclasses.dataclass
class _Job:
    """One image in flight: its padded normalised CAM stays on device until the CRFs return."""

    image_id: str
    shape: tuple[int, int]
    classes: np.ndarray          # [K] 0-based foreground classes, ascending
    x: Any = None                # [Kb, Hb, Wb] normalised CAM (jax array), Kb >= K
    present: Any = None          # [Kb] bool, True for the K real classes
    valid: Any = None            # [Hb, Wb] bool, True inside the image
    probs: Any = None            # CRF input from the jitted core, dropped once submitted
    image: Any = None            # uint8 [H, W, 3], dropped once submitted (pool) or used
    futures: list = dataclasses.field(default_factory=list)


def _checked_id(image_id: str) -> str:
    """``image_id`` if it is usable as a file name in ``out_dir``, else a ValueError."""
    if not image_id or os.sep in image_id or image_id in (".", ".."):
        raise ValueError(f"invalid image id {image_id!r}")
    return image_id


def _prepare(record, settings: _Settings) -> _Job:
    """Loads and validates one record; a ValueError names the id and the file at fault."""
    image_id, image, cams = record
    image_id = str(image_id)
    cam_source = f" ({cams})" if isinstance(cams, (str, os.PathLike)) else ""
    if image is None:
        raise ValueError(f"{image_id}: CAM{cam_source} has no image")
    image_source = f" ({image})" if isinstance(image, (str, os.PathLike)) else ""
    image = io.read_image(os.fspath(image)) if image_source else np.asarray(image)
    cams = io.read_cams(os.fspath(cams)) if cam_source else cams
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{image_id}: image{image_source} must be uint8 [H, W, 3], "
                         f"got {image.dtype} {image.shape}")
    if not isinstance(cams, Mapping):
        raise ValueError(f"{image_id}: CAMs{cam_source} must be a dict {{class: [H, W]}}")
    shape = image.shape[:2]
    classes = sorted(cams)
    for c in classes:
        if (isinstance(c, bool) or not isinstance(c, (int, np.integer))
                or not 0 <= c < settings.num_fg):
            raise ValueError(f"{image_id}: CAM{cam_source} has class index {c!r} outside "
                             f"0..{settings.num_fg - 1} (num_classes={settings.num_fg + 1})")
        cam = np.asarray(cams[c])
        if cam.shape != shape:
            raise ValueError(f"{image_id}: CAM{cam_source} of class {c} has shape {cam.shape}, "
                             f"image{image_source} is {shape}")
        bad = cam.size - np.count_nonzero(np.isfinite(cam))
        if bad:
            raise ValueError(f"{image_id}: CAM{cam_source} of class {c} has {bad} NaN/inf values")
    job = _Job(image_id, shape, np.asarray(classes, np.int64), image=image)
    if classes:
        _pad_and_prepare(job, [cams[c] for c in classes], settings)
    return job


def _bucket(size: int, multiple: int) -> int:
    return max(multiple, math.ceil(size / multiple) * multiple)


def _pad_and_prepare(job: _Job, cams: list, settings: _Settings) -> None:
    """Pads the CAMs to a (classes, H, W) bucket and runs the jitted CRF-input computation.

    The class axis is padded to a power of two (absent slots are masked by ``present``), the
    spatial axes to ``PAD_MULTIPLE`` (``valid`` masks the padding), so jit compiles a handful
    of shapes per split instead of one per image size and label set.
    """
    k = len(cams)
    height, width = job.shape
    kb = min(settings.num_fg, 1 << (k - 1).bit_length())
    hb, wb = _bucket(height, PAD_MULTIPLE), _bucket(width, PAD_MULTIPLE)
    padded = np.zeros((kb, hb, wb), np.float32)
    padded[:k, :height, :width] = np.stack(cams)
    job.present = np.arange(kb) < k
    job.valid = np.zeros((hb, wb), bool)
    job.valid[:height, :width] = True
    job.x, job.probs = _core().crf_inputs(
        padded, job.present, job.valid, settings.alpha, settings.t, settings.s,
        method=settings.method, official_minmax=settings.official_minmax)


def _submit(pool, job: _Job, settings: _Settings) -> _Job:
    """Submits the CRF tasks of one image: one per class (PPMG) or one joint CRF.

    Without a pool (jax backend) the job keeps its image and CRF input for ``_finalize``,
    which runs the CRF, so that a failing CRF fails only its image there too.
    """
    if pool is None:
        return job
    if len(job.classes):
        height, width = job.shape
        probs = np.asarray(job.probs)
        k = len(job.classes)
        if settings.method in _JOINT_METHODS:
            inputs = [probs[:k + 1, :height, :width]]
        else:
            inputs = [probs[c, :, :height, :width] for c in range(k)]
        job.futures = [pool.submit(dense_crf, job.image, np.ascontiguousarray(p), settings.crf)
                       for p in inputs]
    job.image = job.probs = None
    return job


def _finalize(job: _Job, settings: _Settings) -> np.ndarray:
    """Waits for the image's CRFs and returns its ``[H, W]`` uint8 label map (0..C)."""
    height, width = job.shape
    if not len(job.classes):
        return np.zeros(job.shape, np.uint8)
    posteriors = ([future.result() for future in job.futures] if job.futures
                  else _jax_posteriors(job, settings))
    kb, hb, wb = job.x.shape
    if settings.method in _JOINT_METHODS:
        joint = np.zeros((kb + 1, hb, wb), np.float32)
        joint[:len(job.classes) + 1, :height, :width] = posteriors[0]
        labels = _core().argmax_labels(joint, job.present)
    else:
        fg = np.zeros((kb, hb, wb), bool)
        for k, posterior in enumerate(posteriors):
            fg[k, :height, :width] = posterior[1] > FG_THRESHOLD
        labels = _core().ppmg_labels(job.x, fg, job.present, job.valid)
    lookup = np.zeros(kb + 1, np.uint8)
    lookup[1:len(job.classes) + 1] = job.classes + 1
    return lookup[np.asarray(labels)[:height, :width]]


def _jax_posteriors(job: _Job, settings: _Settings) -> list[np.ndarray]:
    """The image's CRF posteriors from ``crf_jax`` in this process, as the pool returns them.

    PPMG: the ``[Kb, 2]`` binary label sets (padding classes included, so the set count is a
    power-of-two bucket; each set is an independent CRF) through one lattice. Joint variants:
    one CRF over exactly the ``K + 1`` real labels (a padded label would change the softmax).
    The image is padded to the ``PAD_MULTIPLE`` bucket with a validity mask.
    """
    from pmm_jax.masks import dense_crf_jax

    height, width = job.shape
    k = len(job.classes)
    probs = np.asarray(job.probs)
    if settings.method in _JOINT_METHODS:
        sets = probs[None, :k + 1, :height, :width]
    else:
        sets = probs[:, :, :height, :width]
    posterior = dense_crf_jax.dense_crf_padded(job.image, sets, settings.crf, multiple=PAD_MULTIPLE)
    job.image = job.probs = None
    return [posterior[0]] if settings.method in _JOINT_METHODS else list(posterior[:k])


@functools.cache
def _core() -> types.SimpleNamespace:
    """The jitted pieces, built on first use so that importing this module never loads JAX."""
    import jax

    from pmm_jax.masks import cvs, ppmg

    @functools.partial(jax.jit, static_argnames=("method", "official_minmax"))
    def crf_inputs(cams, present, valid, alpha, t, s, *, method, official_minmax):
        """Normalised CAM ``x`` and the CRF input: ``[Kb+1,H,W]`` joint or ``[Kb,2,H,W]``."""
        x = cvs.normalize(cams, present, valid, official_quirk=official_minmax)
        x_crf = cvs.cvs(x, present, t, s, valid) if method in _CVS_METHODS else x
        if method in _JOINT_METHODS:
            return x, ppmg.baseline_probs(x_crf, present, alpha)
        return x, ppmg.binary_probs(x_crf, alpha)

    return types.SimpleNamespace(crf_inputs=crf_inputs, ppmg_labels=ppmg.ppmg_labels,
                                 argmax_labels=ppmg.argmax_labels)
