"""``folder_wsss``: a folder of the user's own tagged images, read, checked and built for tfds.

Layout of the folder ``DIR`` (docs/datasets.md, "Your own images"):

* ``images/<id>.jpg|.jpeg|.png``: any size; RGB, greyscale, palette or RGBA (read as RGB);
* ``labels.csv``: header ``id,labels``; ``labels`` lists the image's class names separated
  by ``;`` (empty: an image of background only);
* ``classes.txt`` (optional): one class name per line, in the order of the class indices
  1, 2, ...; without it, the sorted union of the names in ``labels.csv``;
* ``masks/<id>.png`` (optional, any subset): ground truth, 0 background, i the i-th class,
  255 ignore;
* ``train.txt``, ``val.txt`` (optional): id lists. Without them the images with a mask are
  val and the rest train; with only one, the other holds the remaining ids.

:func:`read_folder` reads and checks everything but the pixels (every open: cheap);
:func:`build` then decodes every image and mask into a tfds dataset ``folder_wsss/<key>`` in
the data_dir, under the data_dir's lock, only when that dataset is not there yet. ``<key>``
is a digest of the folder (:func:`fingerprint`: every file's name, size and modification
time, the text files' contents and ``max_side``), so an edited folder is built afresh and an
unchanged one is reused. Bad input raises :class:`InputError` naming the file (and line).

(About 480 lines, one job: a folder in, a checked tfds build out.)

Splits: ``train``, ``val`` (when any) and ``train_masked`` (the train images that have a
mask, when any; the pseudo-masks are scored on them). Images without a mask get an all-255
(ignore) mask. Labels come from ``labels.csv``, not from the masks.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.data.builder_base import (InputError, check_mask, features, load_image,
                                       ordered_futures, png_bytes, read_png_mask)
from pmm_jax.files import safe_io
from pmm_jax.files.locks import data_dir_lock

NAME = "folder_wsss"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Canvas sides are rounded up to a multiple of this (the segmenter's output stride).
CANVAS_MULTIPLE = 8
SUMMARY = "folder.json"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Folder:
    """What :func:`read_folder` found: class names (index 0 background), each id's image,
    mask (or None) and class indices, and the id lists of the splits."""

    root: pathlib.Path
    class_names: tuple[str, ...]
    images: dict[str, pathlib.Path]
    masks: dict[str, pathlib.Path]
    labels: dict[str, tuple[int, ...]]
    train: tuple[str, ...]
    val: tuple[str, ...]
    unused: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> why

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_masked(self) -> tuple[str, ...]:
        return tuple(i for i in self.train if i in self.masks)


def read_text(path: pathlib.Path) -> str:
    """A text file of the folder: UTF-8 (with or without BOM), or UTF-16 with its BOM (Excel's
    "Unicode text"). Anything else (e.g. Windows-1252, Excel's plain "CSV") is an InputError
    naming the line, since its accented letters would read as other class names."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: starts as UTF-16 but is not ({err.reason}); save it "
                             "again as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(
            f"{path} line {line}: byte 0x{data[err.start]:02x} is not UTF-8 (the file is in "
            "another encoding, e.g. Windows-1252 from Excel's plain 'CSV'); save it as UTF-8 "
            "(Excel: 'CSV UTF-8'; an editor: encoding UTF-8)") from None


def _lines(path: pathlib.Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-blank lines of a text file."""
    text = read_text(path)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _files(folder: pathlib.Path, suffixes: tuple[str, ...], what: str) -> dict[str, pathlib.Path]:
    """``{id: path}`` of the files in ``folder`` with one of ``suffixes`` (case-insensitive);
    an id with two files (``a.jpg`` and ``a.png``) is an error."""
    found: dict[str, pathlib.Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith("."):
            continue
        if not path.is_file():
            kind = ("a folder" if path.is_dir() else "a link to nothing" if path.is_symlink()
                    else "not a regular file")
            raise InputError(f"{what}: {path} is {kind} but is named like an image; move it "
                             "out of the folder (or fix the link)")
        if path.stem in found:
            raise InputError(f"{what}: {found[path.stem]} and {path} have the same id "
                             f"{path.stem!r}; keep one file per id")
        found[path.stem] = path
    return found


def read_classes(root: pathlib.Path) -> list[str] | None:
    """The class names of ``classes.txt`` in order, or None when there is none."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names, seen = [], {}
    for number, name in _lines(path):
        if name in seen:
            raise InputError(f"{path} line {number}: class {name!r} repeats line {seen[name]}; "
                             "list each class once")
        if name.lower() == "background":
            raise InputError(f"{path} line {number}: 'background' is class 0 already; list only "
                             "the foreground classes (the first line is class 1)")
        if ";" in name:
            raise InputError(f"{path} line {number}: class {name!r} contains ';', which separates "
                             "class names in labels.csv")
        seen[name] = number
        names.append(name)
    if not names:
        raise InputError(f"{path} lists no class; list one class name per line (or delete it to "
                         "take the classes from labels.csv)")
    return names


def read_labels(path: pathlib.Path) -> dict[str, tuple[int, list[str]]]:
    """``{id: (line number, class names)}`` of ``labels.csv`` (header ``id,labels``)."""
    if not path.is_file():
        raise InputError(f"{path} not found: the folder needs a labels.csv with the header "
                         "'id,labels' and one row per image (docs/datasets.md)")
    rows: dict[str, tuple[int, list[str]]] = {}
    text = read_text(path)
    # Excel's "Unicode text" (UTF-16) separates fields by tabs.
    delimiter = "\t" if text.split("\n", 1)[0].strip() == "id\tlabels" else ","
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if [h.strip() for h in header or []] != ["id", "labels"]:
            raise InputError(f"{path} line 1: the header must be 'id,labels', found "
                             f"{','.join(header or [])!r}")
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > 2:
                raise InputError(f"{path} line {number}: {len(row)} fields; expected 'id,labels' "
                                 "with the labels separated by ';' (quote a field holding a comma)")
            image_id = row[0].strip()
            if not image_id:
                raise InputError(f"{path} line {number}: the id is empty")
            if image_id in rows:
                raise InputError(f"{path} line {number}: duplicate id {image_id!r} (also on line "
                                 f"{rows[image_id][0]}); give each image one row")
            names = [n.strip() for n in (row[1] if len(row) > 1 else "").split(";") if n.strip()]
            rows[image_id] = (number, names)
    if not rows:
        raise InputError(f"{path} has no rows: the folder is empty; add one row per image")
    return rows


def _names_of(rows: dict[str, tuple[int, list[str]]], path: pathlib.Path) -> list[str]:
    """The sorted class names of ``labels.csv`` (no ``classes.txt``). Two spellings of one
    name that differ only in case (``Spot``, ``spot``) are refused, naming both lines: one
    class or two is for the user to say (one spelling, or both listed in classes.txt)."""
    first: dict[str, tuple[str, int]] = {}
    for number, names in sorted(rows.values()):
        for name in names:
            seen = first.setdefault(name.casefold(), (name, number))
            if seen[0] != name:
                raise InputError(
                    f"{path} line {number}: class {name!r} differs from {seen[0]!r} (line "
                    f"{seen[1]}) only in case; use one spelling for one class, or list both in "
                    "classes.txt if they are two classes")
    return sorted({n for _, ns in rows.values() for n in ns})


def _split_list(root: pathlib.Path, name: str, known: dict[str, pathlib.Path]) -> list[str] | None:
    path = root / name
    if not path.is_file():
        return None
    ids, seen = [], {}
    for number, image_id in _lines(path):
        if image_id not in known:
            raise InputError(f"{path} line {number}: id {image_id!r} has no image in "
                             f"{root / 'images'}")
        if image_id in seen:
            raise InputError(f"{path} line {number}: id {image_id!r} repeats line {seen[image_id]}")
        seen[image_id] = number
        ids.append(image_id)
    return ids


def read_folder(root: str | os.PathLike) -> Folder:
    """Reads and checks the folder's lists (not its pixels); raises InputError naming the
    file and line of the first problem."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; config.data.folder must name a folder "
                         "holding images/ and labels.csv (docs/datasets.md)")
    images = _files(root / "images", IMAGE_SUFFIXES, f"{root / 'images'}")
    labels_csv = root / "labels.csv"
    if not images and not labels_csv.exists():
        raise InputError(f"{root} is empty: it needs images/<id>.jpg|.jpeg|.png and a labels.csv "
                         "(header 'id,labels'); see docs/datasets.md")
    if not images:
        raise InputError(f"{root / 'images'} holds no .jpg, .jpeg or .png image: the folder is empty")
    rows = read_labels(labels_csv)
    declared = read_classes(root)
    names = declared if declared is not None else _names_of(rows, labels_csv)
    index = {name: i for i, name in enumerate(names, 1)}
    labels = {}
    for image_id, (number, row_names) in rows.items():
        if image_id not in images:
            raise InputError(f"{labels_csv} line {number}: id {image_id!r} has no image (no "
                             f"{root / 'images' / image_id}.jpg, .jpeg or .png)")
        unknown = [n for n in row_names if n not in index]
        if unknown:
            raise InputError(f"{labels_csv} line {number}: class {unknown[0]!r} of image "
                             f"{image_id!r} is not in {root / 'classes.txt'}; add it there or fix "
                             "the name")
        labels[image_id] = tuple(sorted({index[n] for n in row_names}))
    orphans = [path for image_id, path in images.items() if image_id not in rows]
    if orphans:
        raise InputError(f"{orphans[0]} has no row in {labels_csv}"
                         + (f" (nor do {len(orphans) - 1} more images)" if len(orphans) > 1 else "")
                         + "; add a row 'id,labels' (labels may be empty) or remove the image")
    masks = _files(root / "masks", (".png",), f"{root / 'masks'}")
    stray = [path for image_id, path in masks.items() if image_id not in images]
    if stray:
        raise InputError(f"{stray[0]} has no image in {root / 'images'}; masks are named after "
                         "their image's id")
    train, val = _splits(root, images, masks)
    listed = set(train) | set(val)
    unused = {i: "in neither train.txt nor val.txt" for i in sorted(images) if i not in listed}
    return Folder(root=root, class_names=("background", *names), images=images, masks=masks,
                  labels=labels, train=tuple(train), val=tuple(val), unused=unused)


def _splits(root: pathlib.Path, images, masks) -> tuple[list[str], list[str]]:
    """The train and val ids: the lists' (the other one the remaining ids when only one is
    given), else the images with a mask are val; every val image must have a mask."""
    train, val = _split_list(root, "train.txt", images), _split_list(root, "val.txt", images)
    ids = sorted(images)
    if train is None and val is None:
        train, val = [i for i in ids if i not in masks], [i for i in ids if i in masks]
    elif val is None:
        val = [i for i in ids if i not in set(train)]
    elif train is None:
        train = [i for i in ids if i not in set(val)]
    both = sorted(set(train) & set(val))
    if both:
        raise InputError(f"id {both[0]!r} is in both {root / 'train.txt'} and {root / 'val.txt'}")
    unmasked = [i for i in val if i not in masks]
    if unmasked:
        raise InputError(f"val image {unmasked[0]!r} has no mask {root / 'masks' / unmasked[0]}.png: "
                         "val images are scored against their masks (list it in train.txt, or "
                         "add its mask)")
    if not train:
        raise InputError(f"{root}: no train image (every image has a mask and is used for val); "
                         "add images without masks, or list the train ids in train.txt")
    return sorted(train), sorted(val)


def fingerprint(folder: Folder, max_side: int) -> str:
    """A digest of everything the built dataset depends on: each image's and mask's name,
    size and modification time, the text files' contents and ``max_side``. A folder edited in
    any of them gets a new digest, hence a new build; an unchanged folder reuses its build."""
    digest = hashlib.sha256(f"max_side={max_side}\n".encode())
    for name in ("labels.csv", "classes.txt", "train.txt", "val.txt"):
        path = folder.root / name
        digest.update(f"{name}\n".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    for kind, paths in (("image", folder.images), ("mask", folder.masks)):
        for image_id, path in sorted(paths.items()):
            stat = path.stat()
            digest.update(f"{kind} {path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _shrunk_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``(height, width)`` scaled so the longer side is at most ``max_side`` (0 = as is)."""
    height, width = size
    if not max_side or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_example(folder: Folder, image_id: str, max_side: int) -> dict:
    """The checked tfds example of ``image_id``, its image (and mask) shrunk to ``max_side``."""
    image, size = load_image(folder.images[image_id], image_id)
    if image_id in folder.masks:
        mask = read_png_mask(folder.masks[image_id], image_id)
        path = folder.masks[image_id]
        if mask.shape != size:
            raise InputError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image "
                             f"{folder.images[image_id]} is {size[0]}x{size[1]} (height x width)")
        try:
            check_mask(mask, size, image_id, folder.num_classes - 1)
        except InputError as err:
            raise InputError(f"{path}: {err} (0 is background, i the i-th class of "
                             f"{len(folder.class_names) - 1}, 255 ignore)") from None
    else:
        mask = np.full(size, IGNORE_LABEL, np.uint8)
    target = _shrunk_size(size, max_side)
    if target != size:
        pixels = (image if isinstance(image, np.ndarray)
                  else safe_io.read_image(str(folder.images[image_id])))
        image = np.asarray(Image.fromarray(pixels).resize(target[::-1], Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(target[::-1], Image.NEAREST))
    multi_hot = np.zeros(folder.num_classes - 1, np.float32)
    multi_hot[[c - 1 for c in folder.labels[image_id]]] = 1.0
    return {"id": image_id, "image": image, "mask": png_bytes(mask), "labels": multi_hot}


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """One build of a folder: ``name`` is its :func:`fingerprint`."""

    folder: Folder | None = None
    max_side: int = 0


class FolderWsss(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The tfds builder of one folder (see the module docstring). Not registered: a built
    ``folder_wsss/<key>`` is read back from its files by ``tfds.builder``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (tfds's default lookup needs the ``importlib_resources`` backport)."""
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        folder = self.builder_config.folder
        return self.dataset_info_from_configs(
            features=features(folder.num_classes - 1), supervised_keys=None,
            description=f"Images of {folder.root}", disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        folder = self.builder_config.folder
        splits = {"train": folder.train, "val": folder.val, "train_masked": folder.train_masked}
        return {name: self._generate_examples(ids) for name, ids in splits.items() if ids}

    def _generate_examples(self, ids):
        folder, max_side = self.builder_config.folder, self.builder_config.max_side
        for image_id, future in ordered_futures(
                lambda i: decode_example(folder, i, max_side), ids):
            yield image_id, future.result()


@dataclasses.dataclass(frozen=True)
class Built:
    """A built folder dataset: its tfds ``name`` in ``data_dir`` and what the run needs
    to know of it without reading it (class names, splits, the eval canvas)."""

    name: str
    data_dir: str
    class_names: tuple[str, ...]
    splits: dict[str, int]
    eval_pad_to: tuple[int, int]
    source: str
    folder: Folder | None = None


def _canvas(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The smallest ``(H, W)``, multiples of CANVAS_MULTIPLE, that holds every size."""
    round_up = lambda n: -(-n // CANVAS_MULTIPLE) * CANVAS_MULTIPLE
    return round_up(max(h for h, _ in sizes)), round_up(max(w for _, w in sizes))


def build(root: str | os.PathLike, data_dir: str, max_side: int = 0) -> Built:
    """Reads and checks the folder ``root`` and builds its dataset in ``data_dir`` unless an
    unchanged build is there (under ``data_dir_lock``: concurrent runs build it once).
    Raises InputError naming the file (and line) of bad input."""
    folder = read_folder(root)
    key = fingerprint(folder, max_side)
    name = f"{NAME}/{key}"
    with data_dir_lock(data_dir):
        builder = FolderWsss(data_dir=data_dir, config=FolderConfig(
            name=key, folder=folder, max_side=max_side, description=str(folder.root)))
        summary = os.path.join(builder.data_dir, SUMMARY)
        if not os.path.exists(summary):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            sizes = [tuple(int(v) for v in size) for size in _image_sizes(builder)]
            safe_io.write_json(summary, {
                "name": name, "source": str(folder.root), "class_names": list(folder.class_names),
                "splits": {s: info.num_examples for s, info in builder.info.splits.items()},
                "eval_pad_to": list(_canvas(sizes))})
        record = safe_io.read_json(summary)
    return Built(name=name, data_dir=data_dir, class_names=tuple(record["class_names"]),
                 splits=dict(record["splits"]), eval_pad_to=tuple(record["eval_pad_to"]),
                 source=record["source"], folder=folder)


def _image_sizes(builder: tfds.core.DatasetBuilder):
    """``(height, width)`` of every stored image (read from the PNG/JPEG headers only)."""
    splits = [s for s in ("train", "val") if s in builder.info.splits]
    ds = builder.as_dataset(split="+".join(splits), shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    for example in ds.as_numpy_iterator():
        with Image.open(io.BytesIO(example["image"])) as image:
            yield image.height, image.width


def open_folder(data_config, data_dir: str) -> dict:
    """The ``kinds.DATASET_KINDS`` opener of ``config.data.name == "folder_wsss"``: checks and
    builds ``config.data.folder`` (shrunk to ``config.data.max_side``) in ``data_dir``; its
    fields: the build's name, the folder's class names, the eval canvas, no val split when
    the folder has none, and ``train_masked`` as an optional split (absent when no train
    image has a mask: the pseudo-masks are then not scored)."""
    if not data_config.get("folder"):
        raise InputError("config.data.folder is empty: name the folder of your images with "
                         "--config.data.folder=DIR (layout: docs/datasets.md)")
    built = build(data_config.folder, data_dir, int(data_config.get("max_side", 0)))
    log.info("%s", summary_text(built))
    return {"name": built.name, "class_names": built.class_names,
            "eval_pad_to": built.eval_pad_to,
            "val_split": "val" if "val" in built.splits else None,
            "optional_splits": ("train_masked",)}


def summary_text(built: Built) -> str:
    """What the run uses of the folder, for the log (``main`` shows it): where it is built,
    each class with its count of images (train and val), the split sizes, and the images
    left unused and why."""
    folder = built.folder
    lines = [f"folder dataset {built.source}: built as {built.name} in {built.data_dir}"]
    counts = {c: 0 for c in range(1, len(built.class_names))}
    for image_id in (*folder.train, *folder.val):
        for c in folder.labels[image_id]:
            counts[c] += 1
    lines.append(f"  {len(counts)} classes (images tagged): "
                 + ", ".join(f"{built.class_names[c]} {n}" for c, n in counts.items()))
    lines.append(f"  train {len(folder.train)} images ({len(folder.train_masked)} with a mask), "
                 f"val {len(folder.val)}")
    if folder.unused:
        reasons: dict[str, list[str]] = {}
        for image_id, why in folder.unused.items():
            reasons.setdefault(why, []).append(image_id)
        for why, ids in reasons.items():
            shown = ", ".join(ids[:10]) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
            lines.append(f"  unused: {len(ids)} images {why}: {shown}")
    empty = [built.class_names[c] for c, n in counts.items() if not n]
    if empty:
        lines.append(f"  warning: no train or val image is tagged {', '.join(empty)}")
    return "\n".join(lines)
