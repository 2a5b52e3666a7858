"""File I/O for stage outputs: atomic writes, palette PNG masks, CAM files, JSON.

Every writer here goes through a temporary file in the destination folder followed by
``os.replace``, so a killed process never leaves a half-written output behind and a stage
can treat "the file exists" as "this item is done".

Readers treat every file as untrusted input: a CAM file (a pickled dict, the official
format) is unpickled by :class:`_ClassDictUnpickler`, which admits numpy's own array
reconstruction and nothing else, so a crafted ``.npy`` cannot run code; a bad file of any
kind is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import tempfile
import time
import zipfile
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from pmm_jax.constants import PALETTE

TEMP_PREFIX = ".tmp-"
# When this process started writing, near enough: a temporary file older than this was left by
# an earlier process killed between creating and renaming it (see remove_stale_temps).
_PROCESS_START = time.time()


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
    """Yields a temporary path beside ``path``; renames it onto ``path`` on success. The file
    gets the mode any new file gets (0666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 600, as ``open`` would create it
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    """This process's file mode creation mask (read from /proc without changing it, where
    there is one; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temps(directory: str) -> int:
    """Deletes the temporary files that killed processes left in ``directory``; returns how many.

    A process killed inside :func:`atomic_path` leaves its ``.tmp-*`` file behind; the output
    itself was never written, so the resumed stage writes it again, and this sweep (run by the
    per-image writers before they start) keeps the folder free of the debris. Only files older
    than this process are removed: the other processes of a multi-host run cannot have created
    theirs earlier, since they all start together (``jax.distributed.initialize``).
    """
    if not os.path.isdir(directory):
        return 0
    removed = 0
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
            try:
                if entry.stat().st_mtime < _PROCESS_START:
                    os.remove(entry.path)
                    removed += 1
            except FileNotFoundError:  # another process of the run removed it first
                pass
    return removed


def write_bytes(path: str, data: bytes, *, durable: bool = False) -> None:
    """Atomically writes ``data`` to ``path``. ``durable``: the data reaches the disk
    (fsync) before the rename and the rename before returning (fsync of the folder), so a
    power loss leaves the old file or the whole new one, never an empty one (filesystems
    may otherwise commit the rename before the data)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    if durable:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json(path: str, obj: Any) -> None:
    """Atomically and durably (``write_bytes``) writes ``obj`` as indented JSON: markers,
    records and digests are small, and the pipeline's bookkeeping trusts them."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), durable=True)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_mask(path: str, mask: np.ndarray, text: Mapping[str, str] | None = None) -> None:
    """Atomically writes a ``[H, W]`` label mask (values 0..255) as a VOC-palette PNG, with
    ``text`` as its text chunks (``{key: value}``)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be 2-D, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"{path}: mask values must lie in 0..255")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(PALETTE.reshape(-1).tolist())
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_bytes(path, buffer.getvalue())


def read_mask(path: str) -> np.ndarray:
    """Reads a label PNG (palette or greyscale) as a ``[H, W]`` uint8 array of indices.

    Anything else is a ValueError naming the file: an RGB (colour-coded) label, a 16-bit
    one, or a file that is not a PNG at all, e.g. a JPEG saved under a ``.png`` name (its
    compression smears labels into neighbouring class ids, so scoring it is silently wrong).
    Whether the values are classes of the label space is the caller's check.
    """
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"expected a PNG label image, but the file is {image.format}; "
                                 "labels must be stored losslessly as palette or greyscale PNG")
            if image.mode not in ("P", "L"):
                raise ValueError(f"expected a palette or greyscale label PNG, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{path}: {err}") from err


# Greyscale modes of 16-bit PNGs (Pillow opens them as "I;16"; older Pillow as "I").
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str) -> np.ndarray:
    """Reads an image file as ``[H, W, 3]`` uint8 RGB; the error names the file.

    16-bit greyscale PNGs are rescaled to 8 bits (``round(v * 255 / 65535)``, exact for an
    8-bit image stored as ``v * 257``); ``convert("RGB")`` would clip them to 0 and 255.
    Other wide-range images (32-bit integer or float, e.g. from TIFF) have no defined range
    and are refused. (16-bit RGB PNGs are read by Pillow as 8-bit RGB already.)
    """
    try:
        with Image.open(path) as image:
            return rgb_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise unreadable_image(path, err) from err


def check_image(path: str) -> None:
    """Reads ``path``'s header only: a ValueError naming the file (as :func:`read_image`'s)
    when it is no image Pillow reads, or one larger than Pillow's decompression-bomb limit."""
    try:
        with Image.open(path):
            pass
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise unreadable_image(path, err) from err


def unreadable_image(path: str, err: Exception) -> ValueError:
    """The error naming ``path`` for Pillow's ``err`` (a decompression bomb said as such)."""
    if isinstance(err, Image.DecompressionBombError):
        return ValueError(f"{path}: refused to decode ({err}); a picture that large is more "
                          "likely a decompression bomb than a photograph: shrink it or remove "
                          "it")
    return ValueError(f"{path}: cannot read image ({err})")


def rgb_array(image: Image.Image) -> np.ndarray:
    """An open PIL image as ``[H, W, 3]`` uint8 RGB, 16-bit greyscale rescaled (see
    :func:`read_image`); a ValueError for image modes without a defined 8-bit mapping."""
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image has values outside 0..65535")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise ValueError(f"{image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}) "
                         "images have no defined 8-bit range; convert it to an 8-bit or 16-bit "
                         "PNG or a JPEG")
    return np.array(image.convert("RGB"), dtype=np.uint8)


def write_image(path: str, image: np.ndarray) -> None:
    """Atomically writes an ``[H, W, 3]`` uint8 image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def write_cams(path: str, cams: Mapping[int, np.ndarray]) -> None:
    """Atomically writes CAMs in the official PMM/SEAM format.

    ``cams`` maps a 0-based foreground class index to an ``[H, W]`` normalised CAM; the file
    is a ``.npy`` holding that pickled dict with float16 values, which both this project and
    the official PMM code read.
    """
    payload = {int(k): np.asarray(v, dtype=np.float16) for k, v in cams.items()}
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    write_bytes(path, buffer.getvalue())


def read_cams(path: str) -> dict[int, np.ndarray]:
    """Reads a CAM file written by :func:`write_cams` or by the official PMM/SEAM code.

    Returns ``{0-based class index: [H, W] float32}``. Also accepts a ``.npz`` with arrays
    ``cams`` ``[K, H, W]`` and ``classes`` ``[K]`` (distinct integers). A ``.npy`` is read
    by :func:`read_class_dict` (no code runs from it). An empty dict is a valid file (an
    image without foreground classes). Errors name the file.
    """
    if not path.endswith(".npz"):
        return {k: v.astype(np.float32) for k, v in read_class_dict(path).items()}
    try:
        with np.load(path) as data:
            cams, classes = data["cams"], data["classes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read CAM file ({err})") from err
    if classes.ndim != 1 or classes.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'classes' must be a 1-D integer array, got {classes.dtype} "
                         f"of shape {classes.shape}")
    if cams.ndim != 3 or cams.dtype.kind not in "fiu" or len(cams) != len(classes):
        raise ValueError(f"{path}: 'cams' must be a numeric [K, H, W] array with K = "
                         f"len(classes) = {len(classes)}, got {cams.dtype} of shape {cams.shape}")
    if len(set(classes.tolist())) != len(classes):
        raise ValueError(f"{path}: 'classes' {classes.tolist()} repeats a class")
    return {int(c): cams[i].astype(np.float32) for i, c in enumerate(classes)}


class _ClassDictUnpickler(pickle.Unpickler):
    """Unpickles what ``np.save`` writes for a dict of numpy arrays, and nothing else.

    A pickle can name any importable callable and call it (``os.system``, ``builtins.exec``,
    ...), which is why ``np.load(allow_pickle=True)`` is unsafe on a file from elsewhere.
    Dicts, ints, tuples, lists and bytes are opcodes needing no lookup; the only globals the
    format names are numpy's array, dtype and scalar reconstruction, under the numpy 1.x
    (``numpy.core``) or 2.x (``numpy._core``) module path. Every other global is refused.
    """

    ALLOWED = {
        **{(f"{core}.multiarray", name): obj
           for core in ("numpy.core", "numpy._core")
           for name, obj in (("_reconstruct", np.zeros(0).__reduce__()[0]),
                             ("scalar", np.int64(0).__reduce__()[0]))},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to unpickle {module}.{name}: a dict of numpy arrays never needs it, "
                "and loading it could run arbitrary code") from None


# .npy header readers by format version (3.0 only differs for non-latin-1 field names).
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def read_class_dict(path: str) -> dict[int, np.ndarray]:
    """Reads a ``.npy`` holding a pickled ``{int: numeric array}`` dict without running code.

    That is the official CAM format (``np.save`` of ``{class: CAM}``) and the official
    rough-mask format. The pickle goes through :class:`_ClassDictUnpickler`; keys must be
    integers (Python or numpy, not bool: ``"7"`` or ``2.7`` is not a class index) and values
    real-valued numpy arrays. Anything else, including a refused pickle, is a ValueError
    naming the file. Values are returned as stored.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADERS:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = _NPY_HEADERS[version](f)
            obj = _ClassDictUnpickler(f).load() if dtype.hasobject else None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes
        raise ValueError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if not dtype.hasobject:
        raise ValueError(f"{path}: expected a pickled dict {{class index: HxW array}}, got a "
                         f"plain {dtype} array of shape {shape}")
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if type(obj) is not dict:
        raise ValueError(f"{path}: expected a pickled dict {{class index: HxW array}}, got "
                         f"{type(obj).__name__}")
    for key, value in obj.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
            raise ValueError(f"{path}: key {key!r} ({type(key).__name__}) is not an integer "
                             "class index")
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"{path}: the value of key {key} is {kind}, not a numeric array")
    return {int(k): v for k, v in obj.items()}


def file_sha256(path: str) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
