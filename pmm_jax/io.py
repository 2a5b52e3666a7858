"""File I/O for stage outputs: atomic writes, palette PNG masks, CAM files, JSON.

Every writer here goes through a temporary file in the destination folder followed by
``os.replace``, so a killed process never leaves a half-written output behind and a stage
can treat "the file exists" as "this item is done".
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import pickle
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from pmm_jax.constants import PALETTE


class NonFiniteError(FloatingPointError):
    """A model's output holds NaN or inf and was not written (see :func:`require_finite`)."""


def require_finite(arrays: Iterable[np.ndarray], what: str) -> None:
    """Raises ``NonFiniteError("<what> ... not finite ...")`` unless every array is finite.

    Writers of model outputs call it first, so NaN CAMs or predictions are refused where
    they are produced (``what`` names the stage and the model) instead of failing stages
    later, or not at all.
    """
    bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in arrays)
    if bad:
        raise NonFiniteError(f"{what}: {bad} values are not finite (NaN or inf); refusing to "
                             "write them")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Atomically writes ``data`` to ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """Atomically writes ``obj`` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_mask(path: str, mask: np.ndarray) -> None:
    """Atomically writes a ``[H, W]`` label mask (values 0..255) as a VOC-palette PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be 2-D, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: mask values must lie in 0..255")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    buffer = _io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def read_mask(path: str) -> np.ndarray:
    """Reads a label PNG (palette or greyscale) as a ``[H, W]`` uint8 array of indices."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette or greyscale label PNG, got mode {image.mode}")
        return np.array(image, dtype=np.uint8)


def read_image(path: str) -> np.ndarray:
    """Reads an image file as ``[H, W, 3]`` uint8 RGB; the error names the file."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def write_image(path: str, image: np.ndarray) -> None:
    """Atomically writes an ``[H, W, 3]`` uint8 image as PNG."""
    buffer = _io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def write_cams(path: str, cams: Mapping[int, np.ndarray]) -> None:
    """Atomically writes CAMs in the official PMM/SEAM format.

    ``cams`` maps a 0-based foreground class index to an ``[H, W]`` normalised CAM; the file
    is a ``.npy`` holding that pickled dict with float16 values, which both this project and
    the official PMM code read.
    """
    payload = {int(k): np.asarray(v, dtype=np.float16) for k, v in cams.items()}
    buffer = _io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    write_bytes(path, buffer.getvalue())


def read_cams(path: str) -> dict[int, np.ndarray]:
    """Reads a CAM file written by :func:`write_cams` or by the official PMM/SEAM code.

    Returns ``{0-based class index: [H, W] float32}``. Also accepts a ``.npz`` with arrays
    ``cams`` ``[K, H, W]`` and ``classes`` ``[K]``.
    """
    try:
        if path.endswith(".npz"):
            with np.load(path) as data:
                return {int(c): data["cams"][i].astype(np.float32) for i, c in enumerate(data["classes"])}
        obj = np.load(path, allow_pickle=True)
    except (OSError, ValueError, pickle.UnpicklingError, KeyError, EOFError) as err:
        raise ValueError(f"{path}: cannot read CAM file ({err})") from err
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict {{class index: HxW array}}, got {type(obj).__name__}")
    return {int(k): np.asarray(v, dtype=np.float32) for k, v in obj.items()}
