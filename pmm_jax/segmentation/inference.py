"""Segmenter test-time pipeline: sliding window, multi-scale + flip softmax averaging, dense CRF.

What mmseg (and WSSS_MMSeg's ``EncoderDecoder``) does at test time, each part switchable in
``config.eval``:

* ``sliding_window``: ``(crop, stride)`` or None. mmseg's ``slide_inference``: windows of
  ``min(crop, H) x min(crop, W)`` every ``stride`` pixels, the last one flush with the
  border; each window's logits are upsampled to the window, summed and divided by the
  per-pixel window count. None = the whole image in one pass.
* ``scales`` (default ``(1.0,)``) and ``flip`` (default False): the image is resized by each
  scale (bilinear, half-pixel), optionally also mirrored; each pass's logits are resized back
  to the input size, softmaxed, un-mirrored and averaged (mmseg ``aug_test``).
* ``crf`` (default False): the averaged probabilities of each image, cropped to its unpadded
  size, go through a dense CRF with ``crf_params`` (default ``SEGMENTATION_TEST_CRF``);
  labels are the argmax of the posterior. The implementation is the pipeline's
  ``config.crf.backend`` (``Predictor``'s ``crf_backend``): ``"pydensecrf"`` on the host in a
  ``spawn`` process pool of ``crf_workers`` processes (0 = all cores, 1 = in this process), or
  ``"jax"``: ``pmm_jax.masks.dense_crf_jax`` in this process, one image at a time, each padded up to a
  multiple of 64 pixels (``dense_crf_jax.dense_crf_padded``) so that a split compiles a few shapes
  only (``crf_workers`` is then unused).

Everything before the CRF is one jitted function of the (static) batch shape, so a split
compiles once. Deliberate difference from mmseg: scales apply to the padded eval canvas
(``config.data.eval_pad_to``, 512x512 on VOC) rather than to each image rescaled to a
512-pixel short side, which would give every image its own shapes and compilation.
With every option off, predictions are the argmax of the upsampled logits, as before.
"""

from __future__ import annotations

import concurrent.futures
import os
import weakref
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pmm_jax.files import safe_io
from pmm_jax.masks import dense_crf
from pmm_jax.models.pspnet import resize_bilinear, upsample_logits
from pmm_jax.training import trainer


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of mmseg's sliding windows along one axis of ``length`` pixels."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(grids)]


def slide_logits(apply: Callable[[jax.Array], jax.Array], image: jax.Array, crop: int,
                 stride: int) -> jax.Array:
    """Sliding-window logits ``[B,H,W,K]`` (float32) of ``apply(x) -> [B,h,w,K]`` logits."""
    height, width = image.shape[1:3]
    ch, cw = min(crop, height), min(crop, width)
    total, count = None, np.zeros((height, width, 1), np.float32)
    for y in window_starts(height, crop, stride):
        for x in window_starts(width, crop, stride):
            logits = upsample_logits(apply(image[:, y:y + ch, x:x + cw]), (ch, cw))
            pad = ((0, 0), (y, height - y - ch), (x, width - x - cw), (0, 0))
            total = jnp.pad(logits, pad) if total is None else total + jnp.pad(logits, pad)
            count[y:y + ch, x:x + cw] += 1
    return total / jnp.asarray(count)


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """Size of an image after resizing by ``scale`` (rounded as mmcv does)."""
    return int(size[0] * scale + 0.5), int(size[1] * scale + 0.5)


def _full_logits(apply, image, sliding_window) -> jax.Array:
    """Logits at the size of ``image``: one pass or sliding windows."""
    if sliding_window:
        crop, stride = sliding_window
        return slide_logits(apply, image, int(crop), int(stride))
    return upsample_logits(apply(image), image.shape[1:3])


def averaged_probs(apply: Callable[[jax.Array], jax.Array], image: jax.Array, *,
                   scales: Sequence[float] = (1.0,), flip: bool = False,
                   sliding_window: Sequence[int] | None = None) -> jax.Array:
    """Softmax probabilities ``[B,H,W,K]`` averaged over scales (and mirrored copies)."""
    size = image.shape[1:3]
    total, passes = 0.0, 0
    for scale in scales:
        scaled = image if scale == 1.0 else resize_bilinear(image, scaled_size(size, scale))
        for mirrored in ((False, True) if flip else (False,)):
            x = scaled[:, :, ::-1] if mirrored else scaled
            logits = upsample_logits(_full_logits(apply, x, sliding_window), size)
            probs = jax.nn.softmax(logits, axis=-1)
            total = total + (probs[:, :, ::-1] if mirrored else probs)
            passes += 1
    return total / passes


def eval_options(eval_cfg: Mapping[str, Any]) -> dict:
    """The test-time options of ``config.eval`` with their defaults (all off)."""
    window = eval_cfg.get("sliding_window", None)
    return dict(scales=tuple(float(s) for s in eval_cfg.get("scales", (1.0,))),
                flip=bool(eval_cfg.get("flip", False)),
                sliding_window=tuple(window) if window else None)


def device_fn(eval_cfg: Mapping[str, Any]) -> Callable:
    """``fn(model, batch)`` for ``trainer.make_predict_fn``: ``(out, finite)`` with ``out``
    uint8 labels ``[B,H,W]``, or the averaged probabilities ``[B,H,W,K]`` when the CRF is on
    (it needs them on the host), and ``finite[B]``: whether each row's probabilities are all
    finite (an argmax of NaN is a label like any other)."""
    options, use_crf = eval_options(eval_cfg), bool(eval_cfg.get("crf", False))

    def fn(model, batch):
        probs = averaged_probs(lambda x: model(x)["logits"], batch["image"], **options)
        finite = jnp.all(jnp.isfinite(probs), axis=(1, 2, 3))
        return (probs if use_crf else jnp.argmax(probs, axis=-1).astype(jnp.uint8)), finite

    return fn


def _crf_executor(workers: int) -> concurrent.futures.Executor | None:
    """A spawn process pool of ``workers`` processes (0 = all cores), each exiting when this
    process dies (``dense_crf.process_pool``); None = in-process."""
    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1:
        return None
    return dense_crf.process_pool(workers)


def _jax_dense_crf(image: np.ndarray, probs: np.ndarray, params: dense_crf.CRFParams) -> np.ndarray:
    """``dense_crf.dense_crf``'s contract (``[L, H, W]`` posterior) with ``pmm_jax.masks.dense_crf_jax``."""
    from pmm_jax.masks import dense_crf_jax

    return dense_crf_jax.dense_crf_padded(image, probs[None], params)[0]


class Predictor:
    """``predict(host_batch) -> uint8 labels [B,H,W]`` with the test-time options of
    ``eval_cfg``; rows are padded like the batch (callers crop each to height x width).
    ``crf_backend``: the dense CRF implementation (``config.crf.backend``, see
    ``pmm_jax.masks.dense_crf.BACKENDS``) when ``eval_cfg.crf`` is on. ``source`` names the model (and the
    stage that trained it) in the ``safe_io.NonFiniteError`` raised when a valid row's
    probabilities are not finite."""

    def __init__(self, model, eval_cfg: Mapping[str, Any],
                 crf_backend: str = dense_crf.DEFAULT_BACKEND, source: str = "the segmenter"):
        self._device = trainer.make_predict_fn(model, device_fn(eval_cfg))
        self._source = source
        self._crf = bool(eval_cfg.get("crf", False))
        params = eval_cfg.get("crf_params", None)
        self._params = dense_crf.CRFParams.from_config(params) if params else dense_crf.SEGMENTATION_TEST_CRF
        self._backend = dense_crf.check_backend(crf_backend)
        use_pool = self._crf and self._backend == "pydensecrf"
        self._pool = _crf_executor(int(eval_cfg.get("crf_workers", 0))) if use_pool else None
        if self._pool is not None:
            weakref.finalize(self, self._pool.shutdown)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        out, finite = self._device(batch)
        valid = batch.get("valid", np.ones(len(finite), bool))
        bad = np.flatnonzero(valid & ~finite)
        if len(bad):
            ids = [batch["id"][i].decode() if "id" in batch else str(i) for i in bad]
            raise safe_io.NonFiniteError(
                f"{self._source}: the segmentation probabilities of image(s) {ids} are not "
                "finite (NaN or inf); refusing to write predictions from them")
        return self._crf_labels(out, batch) if self._crf else out

    def _crf_labels(self, probs: np.ndarray, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """CRF labels of the valid rows, each on its unpadded ``height x width`` region."""
        labels = np.zeros(probs.shape[:3], np.uint8)
        valid = batch.get("valid", np.ones(len(probs), bool))
        sizes = {i: (int(batch["height"][i]), int(batch["width"][i])) for i in np.flatnonzero(valid)}
        raws = [batch["raw"][i, :h, :w] for i, (h, w) in sizes.items()]
        crops = [np.ascontiguousarray(probs[i, :h, :w].transpose(2, 0, 1))
                 for i, (h, w) in sizes.items()]
        # Workers run pmm_jax.masks.dense_crf only (numpy + pydensecrf): a spawned child imports no JAX.
        mapper = map if self._pool is None else self._pool.map
        fn = _jax_dense_crf if self._backend == "jax" else dense_crf.dense_crf
        posteriors = mapper(fn, raws, crops, [self._params] * len(raws))
        for (i, (h, w)), posterior in zip(sizes.items(), posteriors):
            labels[i, :h, :w] = np.argmax(posterior, axis=0)
        return labels


def predictor(model, config, source: str = "the segmenter") -> Predictor:
    """The ``Predictor`` of a pipeline config: test-time options ``config.eval``, CRF backend
    ``config.crf.backend`` (validated; pydensecrf when the config has none)."""
    return Predictor(model, config.eval, crf_backend=dense_crf.config_backend(config), source=source)
