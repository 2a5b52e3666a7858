"""Fake dataset trees the tests write: the pieces of VOCdevkit + SBD and COCO 2014 archives.

Two kinds of tree are written from these pieces:

* tiny trees with a handful of images of 10-30 pixels (``tests/data/test_voc.py``,
  ``tests/data/test_coco.py``) that check the builders' rules exactly;
* rehearsal trees (``write_voc_rehearsal_tree``, ``write_coco_rehearsal_tree``) at real image
  sizes and orientations (VOC's 500x375, 375x500, 500x333, 281x500 ...; COCO's 640x480 ...),
  21 VOC classes with 255 borders, 80 COCO categories on the 91-id range with its gaps and
  crowd regions, on which ``tests/test_rehearsal.py`` runs the paper configs end to end. They
  use the real VOC photographs of ``../shared/data/voc_samples`` when present and drawn scenes
  (smooth backgrounds, solid shapes: image-like for the dense CRF, unlike noise) otherwise.

``python -m tests.support.fake_trees voc|coco OUT_DIR`` writes a rehearsal tree for a manual run
(docs/rehearsal.md).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import scipy.io
import scipy.ndimage
from PIL import Image, ImageDraw

from pmm_jax.files import safe_io
from tests.support.paths import VOC_SAMPLES


# --- pieces shared by every tree -------------------------------------------------------------

def write_jpeg(path: pathlib.Path, size: tuple[int, int], seed: int) -> None:
    """A random-noise JPEG of ``size`` (height, width)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    save_jpeg(path, pixels)


def save_jpeg(path: pathlib.Path, pixels: np.ndarray, grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert("L") if grey else image).save(path, format="JPEG", quality=90)


def random_mask(size: tuple[int, int], seed: int) -> np.ndarray:
    """Background with two class rectangles and a void band, like a VOC mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(size, np.uint8)
    for cls in rng.choice(np.arange(1, 21), size=2, replace=False):
        y, x = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 4)
        mask[y:y + 4, x:x + 4] = cls
        mask[y, x:x + 4] = 255
    return mask


def write_sbd_mat(path: pathlib.Path, mask: np.ndarray) -> None:
    """An SBD ``cls`` file: struct ``GTcls`` with ``Segmentation``, ``Boundaries``, ``CategoriesPresent``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros((1, 1)),
                                      "CategoriesPresent": present}})


def rect(x0, y0, x1, y1) -> list[list[int]]:
    """A COCO polygon segmentation of the rectangle ``[x0, x1) x [y0, y1)``."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(region: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major pixels, starting with zeros."""
    flat = region.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"counts": np.diff(np.concatenate([[0], changes])).tolist(), "size": list(region.shape)}


def crowd_region(shape, rows: slice, cols: slice) -> dict:
    region = np.zeros(shape, bool)
    region[rows, cols] = True
    return uncompressed_rle(region)


# --- scenes at real sizes --------------------------------------------------------------------

def draw_scene(height: int, width: int, classes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image-like ``[H, W, 3]`` picture and its ``[H, W]`` mask: a smooth two-colour
    background and one solid ellipse or rectangle per class (value = the class), the later
    shape on top."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = rng.integers(40, 216, (2, 3))
    background = top + ramp * (bottom - top) + np.zeros((1, width, 1))
    image = Image.fromarray(background.astype(np.uint8))
    mask = Image.new("L", (width, height), 0)
    for cls in classes:
        w, h = rng.integers(width // 5, width // 2), rng.integers(height // 5, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        kind = "ellipse" if rng.random() < 0.5 else "rectangle"
        getattr(ImageDraw.Draw(image), kind)((x, y, x + w, y + h),
                                             fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        getattr(ImageDraw.Draw(mask), kind)((x, y, x + w, y + h), fill=int(cls))
    pixels = np.asarray(image, np.int16) + rng.integers(-6, 7, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(mask, np.uint8)


def void_borders(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """``mask`` with a void (255) band of about ``2 * width`` pixels on every class boundary,
    as VOC's annotations have."""
    edge = np.zeros(mask.shape, bool)
    edge[1:, :] |= mask[1:, :] != mask[:-1, :]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    band = scipy.ndimage.binary_dilation(edge, iterations=width)
    return np.where(band, 255, mask).astype(np.uint8)


def sample_photos(samples_dir=VOC_SAMPLES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{VOC id: (image, mask)}`` of the real photographs in ``samples_dir`` ({} if absent)."""
    if samples_dir is None or not pathlib.Path(samples_dir).is_dir():
        return {}
    photos = {}
    for label in sorted(pathlib.Path(samples_dir).glob("*_label.png")):
        image_id = label.name[:-len("_label.png")]
        photos[image_id] = (safe_io.read_image(str(label.with_name(f"{image_id}.png"))),
                            safe_io.read_mask(str(label)))
    return photos


# (id, (height, width)) of the VOC rehearsal tree. The 2007 ids are photographs of
# ../shared/data/voc_samples (same size) when present; the 2008 ids are always drawn.
VOC_REHEARSAL_TRAIN = (("2007_000033", (366, 500)), ("2007_000129", (500, 334)),
                       ("2007_000332", (333, 500)), ("2008_000002", (375, 500)))
VOC_REHEARSAL_VAL = (("2007_000346", (375, 500)), ("2007_000847", (500, 375)),
                     ("2007_001284", (375, 500)))
# SBD: two new train ids, one new val id (both in train_aug), and one id of each VOC split.
VOC_REHEARSAL_SBD_TRAIN = (("2008_000010", (500, 375)), ("2008_000011", (500, 281)),
                           ("2007_000129", (500, 334)))
VOC_REHEARSAL_SBD_VAL = (("2008_000012", (333, 500)), ("2007_000346", (375, 500)))


def write_voc_rehearsal_tree(root: pathlib.Path, samples_dir=VOC_SAMPLES) -> dict[str, dict]:
    """A VOCdevkit + SBD tree under ``root`` at real VOC sizes; returns ``{split: {id: (H, W)}}``
    for "train" (VOC), "train_aug" and "val"."""
    photos = sample_photos(samples_dir)
    vocdir = root / "VOCdevkit" / "VOC2012"
    lists = vocdir / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    sbd = root / "benchmark_RELEASE" / "dataset"
    scenes = {}
    everything = (VOC_REHEARSAL_TRAIN + VOC_REHEARSAL_VAL + VOC_REHEARSAL_SBD_TRAIN
                  + VOC_REHEARSAL_SBD_VAL)
    for n, (image_id, (height, width)) in enumerate(dict(everything).items()):
        if image_id in photos:
            scenes[image_id] = photos[image_id]
        else:  # 1-3 of the 20 classes; over the tree every class number is used
            classes = [1 + (3 * n + k) % 20 for k in range(1 + n % 3)]
            scenes[image_id] = draw_scene(height, width, classes, seed=n)
        assert scenes[image_id][1].shape == (height, width), image_id
        save_jpeg(vocdir / "JPEGImages" / f"{image_id}.jpg", scenes[image_id][0])
    for name, ids in (("train", VOC_REHEARSAL_TRAIN), ("val", VOC_REHEARSAL_VAL)):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i, _ in ids))
        for image_id, _ in ids:
            safe_io.write_mask(str(vocdir / "SegmentationClass" / f"{image_id}.png"),
                          void_borders(scenes[image_id][1]))
    for name, ids in (("train", VOC_REHEARSAL_SBD_TRAIN), ("val", VOC_REHEARSAL_SBD_VAL)):
        (sbd / f"{name}.txt").parent.mkdir(parents=True, exist_ok=True)
        (sbd / f"{name}.txt").write_text("".join(f"{i}\n" for i, _ in ids))
        for image_id, _ in ids:  # SBD masks have no void band
            write_sbd_mat(sbd / "cls" / f"{image_id}.mat", scenes[image_id][1])
    val = dict(VOC_REHEARSAL_VAL)
    train_aug = {i: s for i, s in dict(VOC_REHEARSAL_TRAIN + VOC_REHEARSAL_SBD_TRAIN
                                       + VOC_REHEARSAL_SBD_VAL).items() if i not in val}
    return {"train": dict(VOC_REHEARSAL_TRAIN), "train_aug": train_aug, "val": val}


# (split, number, (height, width), grey, category ids, crowd) of the COCO rehearsal tree:
# COCO sizes and orientations, category ids across the 1..90 range (27 and 90 sit next to the
# unused ids 26 and 83..89), crowd regions, a greyscale image and one without objects.
COCO_REHEARSAL = (
    ("train", 9, (480, 640), False, (1, 18), True),
    ("train", 25, (640, 480), False, (27, 90), False),
    ("train", 30, (427, 640), True, (44,), False),
    ("train", 34, (640, 427), False, (62, 3, 1), True),
    ("train", 36, (375, 500), False, (), False),
    ("train", 42, (612, 612), False, (17, 84), False),
    ("val", 73, (480, 640), False, (1, 90), True),
    ("val", 74, (640, 480), False, (18,), False),
    ("val", 77, (427, 640), False, (6, 44), False),
)


def coco_file_id(split: str, number: int) -> str:
    return f"COCO_{split}2014_{number:012d}"


def _polygon(rng, height: int, width: int) -> list[float]:
    """A convex polygon (ellipse outline, 12 corners) inside the image."""
    w, h = rng.integers(width // 5, width // 2), rng.integers(height // 5, height // 2)
    cx, cy = rng.integers(w // 2, width - w // 2), rng.integers(h // 2, height - h // 2)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    return [float(v) for a in angles for v in (cx + w / 2 * np.cos(a), cy + h / 2 * np.sin(a))]


def write_coco_rehearsal_tree(root: pathlib.Path, samples_dir=VOC_SAMPLES) -> dict[str, dict]:
    """A COCO 2014 tree under ``root`` (train2014/, val2014/, annotations/instances_*.json
    with all 80 categories); returns ``{split: {file id: (H, W)}}``."""
    from pmm_jax.constants import COCO_CATEGORIES

    photos = list(sample_photos(samples_dir).values())
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": name, "supercategory": "x"} for i, name in COCO_CATEGORIES]
    sizes: dict[str, dict[str, tuple[int, int]]] = {"train": {}, "val": {}}
    records = {"train": ([], []), "val": ([], [])}
    for split, number, (height, width), grey, category_ids, crowd in COCO_REHEARSAL:
        rng = np.random.default_rng(number)
        name = coco_file_id(split, number)
        if photos:  # a photograph as the background, resized to this image's size
            image = Image.fromarray(photos[number % len(photos)][0]).resize((width, height))
        else:
            image = Image.fromarray(draw_scene(height, width, (), seed=number)[0])
        images, annotations = records[split]
        for k, category in enumerate(category_ids):
            polygon = _polygon(rng, height, width)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            ImageDraw.Draw(image).polygon(polygon, fill=colour)
            annotations.append({"id": number * 10 + k, "image_id": number,
                                "category_id": category, "segmentation": [polygon],
                                "iscrowd": 0, "area": 1.0, "bbox": [0, 0, 1, 1]})
        if crowd:  # a crowd of the first category along the bottom edge
            annotations.append({"id": number * 10 + 9, "image_id": number,
                                "category_id": category_ids[0], "iscrowd": 1, "area": 1.0,
                                "bbox": [0, 0, 1, 1],
                                "segmentation": crowd_region((height, width),
                                                             slice(height - height // 8, height),
                                                             slice(0, width // 2))})
        save_jpeg(root / f"{split}2014" / f"{name}.jpg", np.asarray(image), grey=grey)
        images.append({"id": number, "file_name": f"{name}.jpg", "height": height,
                       "width": width})
        sizes[split][name] = (height, width)
    for split, (images, annotations) in records.items():
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return sizes


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("voc", "coco"):
        print("usage: python -m tests.support.fake_trees voc|coco OUT_DIR", file=sys.stderr)
        return 2
    root = pathlib.Path(argv[2]).expanduser()
    write = write_voc_rehearsal_tree if argv[1] == "voc" else write_coco_rehearsal_tree
    sizes = write(root)
    print(f"wrote a {argv[1]} rehearsal tree in {root}: "
          + ", ".join(f"{split} {len(ids)}" for split, ids in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
