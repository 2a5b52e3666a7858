"""Host-side fully connected CRF (Krähenbühl & Koltun) through pydensecrf.

numpy in, numpy out; never call this under ``jax.jit``. The pseudo-mask stage runs it in a
process pool (one binary CRF per present class for PPMG, one joint CRF for the baseline) and
the segmentation test runs it on the averaged softmax. Unary and pairwise terms match the
official PMM ``crf_inference``: unary ``-log(clip(p, 1e-5, 1))`` of the (not renormalised)
input scores, one Gaussian and one bilateral Potts kernel, a fixed number of mean-field
iterations.

Two implementations of the same CRF are selectable wherever a CRF runs (pseudo-masks,
segmentation test time, cyclic masks) with ``config.crf.backend`` (``BACKENDS``):
``"pydensecrf"`` (this module, the default) and ``"jax"`` (``pmm_jax.masks.dense_crf_jax``, jitted, in
the calling process). ``check_backend``, ``config_backend`` and ``backend_and_params`` read
and validate the choice; this module never imports JAX itself (it is what the spawned CRF
workers import). :func:`process_pool` makes those workers (pseudo-mask generation and the
segmentation test's CRF): spawned, and each exits when its parent process dies, even by
``kill -9``, instead of outliving the run.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import threading
import time

import numpy as np

# Probabilities are clipped to [UNARY_CLIP, 1] before the log (pydensecrf default, official).
UNARY_CLIP = 1e-5


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Kernel widths, compatibilities (Potts weights) and mean-field iterations of a dense CRF.

    Defaults are the official pseudo-mask CRF (Gaussian sxy 3 compat 10; bilateral sxy 80
    srgb 13 compat 10; 10 iterations).
    """

    gauss_sxy: float = 3.0
    gauss_compat: float = 10.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "iterations":
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                    raise ValueError(f"CRFParams.iterations must be an int >= 0, got {value!r}")
            elif not np.isfinite(value) or value <= 0:
                raise ValueError(f"CRFParams.{field.name} must be a positive number, got {value!r}")

    @classmethod
    def from_config(cls, mapping):
        """Build from a mapping (dict or ml_collections ConfigDict) of field names to values.

        Missing keys keep their defaults; an unknown key (likely a typo) raises ValueError
        naming it and the allowed keys.
        """
        if not hasattr(mapping, "items"):
            raise TypeError(
                f"CRFParams.from_config expects a mapping, got {type(mapping).__name__}")
        values = dict(mapping.items())
        allowed = tuple(field.name for field in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown CRF parameter(s) {unknown}; allowed: {allowed}")
        return cls(**values)


# Dense CRF implementations (``config.crf.backend``): pydensecrf on the host (a process pool
# for throughput) or pmm_jax.masks.dense_crf_jax (JAX, in the calling process; wins on an accelerator).
BACKENDS = ("pydensecrf", "jax")
DEFAULT_BACKEND = "pydensecrf"


def check_backend(backend, key="crf.backend"):
    """``backend`` if it is one of ``BACKENDS``, else a ValueError naming ``key`` and them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown dense CRF backend {key}={backend!r}; allowed values: "
                         + ", ".join(repr(b) for b in BACKENDS))
    return backend


def config_backend(config):
    """The validated ``config.crf.backend`` of a pipeline config (``DEFAULT_BACKEND`` when the
    config has no ``crf`` section or no ``backend`` key)."""
    section = config.get("crf", None) if hasattr(config, "get") else None
    backend = section.get("backend", DEFAULT_BACKEND) if section is not None else DEFAULT_BACKEND
    return check_backend(backend)


def backend_and_params(mapping, key="crf"):
    """``(backend, CRFParams)`` of a CRF section: ``CRFParams`` fields plus an optional
    ``backend`` (default ``DEFAULT_BACKEND``), as in ``pmm_jax.pseudo_masks``' config."""
    if not hasattr(mapping, "items"):
        raise TypeError(f"{key} must be a mapping, got {type(mapping).__name__}")
    values = dict(mapping.items())
    backend = check_backend(values.pop("backend", DEFAULT_BACKEND), f"{key}.backend")
    return backend, CRFParams.from_config(values)


# Pseudo-mask generation (official refine_cam.py).
PSEUDO_MASK_CRF = CRFParams()
# Segmentation test-time CRF (WSSS_MMSeg; DeepLab's ResNet setting).
SEGMENTATION_TEST_CRF = CRFParams(
    gauss_sxy=1.0, gauss_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
    bilateral_compat=4.0, iterations=10,
)


def dense_crf(image, probs, params):
    """Mean-field posterior of a dense CRF: ``[L, H, W]`` float32, each pixel sums to 1.

    ``image``: ``[H, W, 3]`` uint8 (the colour order does not matter: the bilateral kernel uses
    one ``srgb`` for all channels). ``probs``: ``[L, H, W]`` scores in [0, 1], L >= 1; they are
    not renormalised, only clipped to ``[1e-5, 1]`` before ``-log``
    (``pydensecrf.utils.unary_from_softmax``), exactly as the official code feeds
    ``[(1 - x) ** alpha, x]``. ``params``: a ``CRFParams``.
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must be [L, H, W] with L >= 1, got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs spatial shape {probs.shape[1:]} does not match image {image.shape[:2]}")
    if not np.issubdtype(probs.dtype, np.floating) or not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite floating-point scores")
    if not isinstance(params, CRFParams):
        raise TypeError(f"params must be a CRFParams, got {type(params).__name__}")

    # pydensecrf is imported here, so the jax backend and GPU machines without it can import
    # this module (its parameters and backend checks).
    import pydensecrf.densecrf as dcrf  # noqa: PLC0415
    from pydensecrf.utils import unary_from_softmax  # noqa: PLC0415

    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=UNARY_CLIP)))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
        # pydensecrf needs a writeable C-contiguous buffer (PIL and JAX give read-only ones).
        rgbim=np.require(image, requirements=("C_CONTIGUOUS", "WRITEABLE")),
        compat=params.bilateral_compat)
    posterior = crf.inference(params.iterations)
    return np.asarray(posterior, dtype=np.float32).reshape(num_labels, height, width)


# How often a pool worker checks that its parent is alive (seconds).
PARENT_POLL_SECONDS = 0.5


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A ``spawn`` process pool of ``workers`` CRF workers that exit when this process dies."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent, initargs=(os.getpid(),))


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: a daemon thread ends this worker as soon as its parent (``parent_pid``)
    is gone (the worker is then re-parented, so ``os.getppid()`` changes). Without it a
    killed run's workers, and the resource tracker they keep open, would run on idle."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

