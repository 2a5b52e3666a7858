"""What every tensorflow-datasets builder of this project builds on.

* The feature layout (:func:`features`) and the image-level labels derived from a mask
  (:func:`labels_from_mask`), so every dataset yields the same examples: ``id``, ``image``
  (uint8 RGB), ``mask`` (uint8 ``[H, W, 1]``, 255 = void) and ``labels`` (multi-hot).
* Reading the user's files: :func:`load_image` (any image decoded to RGB, JPEGs kept as their
  bytes), :func:`read_png_mask`, :func:`png_bytes`, and the checks that stop on bad input with
  a message naming the file or id (:class:`InputError`, :func:`require_dir`,
  :func:`read_id_list`, :func:`check_size`, :func:`check_mask`).
* :class:`ManualBuilder`, the base of builders that read a folder the user provides (the
  *manual dir*: VOC, COCO), with :func:`ordered_futures` decoding images on threads and
  corrupt images skipped on request.
* :func:`prepare`: a registered builder of ``data_dir``, generated on first use when it needs
  no download, otherwise required to be prepared already.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import io
import os
import pathlib
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, UnidentifiedImageError
from tensorflow_datasets.core.utils import gcs_utils

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.files.safe_io import rgb_array, unreadable_image
from pmm_jax.files.locks import data_dir_lock


def labels_from_mask(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Multi-hot float32 ``[num_foreground]`` (foreground classes): class c (mask value c+1) is
    present if any pixel shows it; 0 (background) and 255 (void) do not count."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    return (counts[1:num_foreground + 1] > 0).astype(np.float32)


class InputError(ValueError):
    """The manual-download input is missing or malformed; the message says what and where."""


class CorruptImageError(InputError):
    """An image file exists but does not decode; ``path`` names it."""

    def __init__(self, path: pathlib.Path, reason: str):
        super().__init__(f"corrupt image {path}: {reason}")
        self.path = path


def require_dir(path: pathlib.Path, what: str, expected_tree: str) -> pathlib.Path:
    """Returns ``path`` if it is a folder; otherwise raises with the expected tree."""
    if not path.is_dir():
        raise InputError(f"{what} not found: {path} is not a folder.\n\n"
                         f"Expected layout of the manual dir:\n{expected_tree}")
    return path


def read_id_list(path: pathlib.Path, expected_tree: str) -> list[str]:
    """The ids of a split list file (one per line, blank lines ignored)."""
    if not path.is_file():
        raise InputError(f"split list not found: {path}\n\nExpected layout of the manual dir:\n"
                         f"{expected_tree}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_image(path: pathlib.Path, image_id: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """Reads and fully decodes an image; returns what to store and its ``(height, width)``.

    A JPEG in RGB or greyscale is stored as its original bytes (decoding it later with three
    channels gives RGB); any other image is stored as a uint8 RGB array (``safe_io.rgb_array``:
    16-bit greyscale is rescaled, not clipped). Decoding here catches truncated or corrupt
    files at preparation time instead of during training.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"id {image_id!r} is listed but has no image: {path} does not exist") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = (image.height, image.width)
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data, size
            return rgb_array(image), size
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise InputError(str(unreadable_image(str(path), err))) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(path, str(err)) from err


def check_size(mask_size: tuple[int, int], image_size: tuple[int, int], image_id: str) -> None:
    """Raises unless the ``(height, width)`` of a mask equals that of its image."""
    if tuple(mask_size) != tuple(image_size):
        raise InputError(f"id {image_id!r}: mask size {mask_size[0]}x{mask_size[1]} differs from "
                         f"image size {image_size[0]}x{image_size[1]} (height x width)")


def check_mask(mask: np.ndarray, image_size: tuple[int, int], image_id: str, max_label: int) -> None:
    """Raises unless ``mask`` is ``image_size`` and holds only 0..max_label and 255."""
    check_size(mask.shape, image_size, image_id)
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = np.flatnonzero(counts[max_label + 1:IGNORE_LABEL]) + max_label + 1
    if bad.size:
        raise InputError(f"id {image_id!r}: mask values {bad.tolist()} outside 0..{max_label} "
                         f"and {IGNORE_LABEL}")


def png_bytes(mask: np.ndarray) -> bytes:
    """A ``[H, W]`` uint8 mask as greyscale PNG bytes (what the ``mask`` feature stores)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def ordered_futures(fn: Callable, items: Iterable, window: int = 64) -> Iterator[tuple]:
    """Yields ``(item, future of fn(item))`` in input order, running ``fn`` on a thread pool.

    At most ``window`` items are in flight, so memory stays bounded on 100k-image splits.
    Image decoding and PNG encoding release the GIL, so threads use every core.
    """
    workers = min(16, len(os.sched_getaffinity(0)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders that read a manual dir; handles corrupt images.

    ``skip_corrupt=False`` (the default) stops at the first image that does not decode, with
    an error naming the file; ``skip_corrupt=True`` leaves such images out of every split
    that lists them and records their paths in the set ``skipped_corrupt``.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The file defining the builder. tfds's default lookup imports the
        ``importlib_resources`` backport, which tfds 4.9.x only declares for Python < 3.9."""
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, skip_corrupt: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.skip_corrupt = skip_corrupt
        self.skipped_corrupt: set[pathlib.Path] = set()

    def _examples(self, ids: Iterable[str], make_example: Callable[[str], dict]
                  ) -> Iterator[tuple[str, dict]]:
        """``(id, make_example(id))`` for every id, in order, skipping corrupt images if asked."""
        for image_id, future in ordered_futures(make_example, ids):
            try:
                example = future.result()
            except CorruptImageError as err:
                if not self.skip_corrupt:
                    raise
                logging.warning("skipping %s", err)
                self.skipped_corrupt.add(err.path)
                continue
            yield image_id, example


def features(num_foreground: int) -> tfds.features.FeaturesDict:
    """The features of every dataset here, with variable image sizes and ``num_foreground``
    foreground labels (``synthetic_wsss`` has the same with a fixed image size)."""
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(None, None, 3)),
        "mask": tfds.features.Image(shape=(None, None, 1)),
        "labels": tfds.features.Tensor(shape=(num_foreground,), dtype=np.float32),
    })



def read_png_mask(path: pathlib.Path, image_id: str) -> np.ndarray:
    """A palette or greyscale label PNG as ``[H, W]`` uint8 class indices."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise InputError(f"id {image_id!r}: {path} is a {image.format} file; expected a "
                                 "palette or greyscale label PNG (lossy compression corrupts "
                                 "labels)")
            if image.mode not in ("P", "L"):
                raise InputError(f"id {image_id!r}: {path} is a {image.mode} image; expected a "
                                 "palette or greyscale label PNG")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"id {image_id!r} has no mask: {path} does not exist") from None
    except OSError as err:
        raise InputError(f"id {image_id!r}: cannot read mask {path}: {err}") from err


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset built from user downloads is not in the data_dir; the message says how to
    build it (``pmm_jax.main`` prints just that message)."""


def prepare(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of tfds dataset ``name`` (e.g. ``"synthetic_wsss/demo"``) in ``data_dir``.

    A builder that needs no download (``synthetic_wsss``) is generated on first use; calling
    again is cheap (tfds reuses a prepared dataset). A builder read from a manual dir
    (``voc2012_wsss``, ``coco2014_wsss``) must already be prepared, by ``python -m
    pmm_jax.data.prepare`` (``docs/datasets.md``); otherwise this raises
    :class:`DatasetNotPreparedError` saying so. ``name`` must be registered (its module
    imported). Generating holds :func:`data_dir_lock`, so runs sharing ``data_dir`` build it
    once (the others wait, then reuse it). Offline by construction: GCS lookups are disabled
    and ``try_gcs``/``try_download_gcs`` are off, so tfds never reaches for ``gs://tfds-data``.
    """
    gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"dataset {name} is not prepared in {data_dir}; build it from the downloaded "
            "archives with `python -m pmm_jax.data.prepare` (see docs/datasets.md)")
    if not builder.is_prepared():
        with data_dir_lock(data_dir):  # another run sharing data_dir may be building it
            builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
