"""``synthetic_wsss``: a procedural weakly-supervised segmentation dataset (no download).

Every image is rendered by :func:`render_sample` from its own seed, so the dataset is the same
on every machine, needs no network, and the ``demo`` config builds in about 11 CPU-seconds.
It is made to show the two failure modes PMM targets, at a scale a CPU can train on:

* **Partial activation (fixed by CVS).** Each of the five foreground classes (``ring``,
  ``kite``, ``comet``, ``bar``, ``blob``; see ``SYNTHETIC_CLASSES``) is a large *body* plus a
  small *part* (6-12 % of the object's area). The part has a saturated class colour (red, yellow,
  cyan, magenta, green) and a high-contrast pattern; the bodies share one muted, earthy colour
  distribution and carry only a weak (~7 %) texture. The background also contains *decoys*:
  bodies of the real classes without their part, and ellipses in body colours. A body on its
  own is therefore not evidence of a class, and a classifier's CAM peaks on the part, leaving
  most of the object under-activated: the distribution CVS is meant to flatten.
* **Competing, overlapping CAMs (fixed by PPMG).** Images hold 1-3 objects; 75 % of the
  further objects are placed against an earlier one so they touch or occlude it, and the
  second object is the first one's partner class (ring with kite, comet with bar, blob with
  ring) 60 % of the time. Per-class CAMs then
  overlap near the shared edge and the naive argmax has to arbitrate between them.

Ground-truth masks mark a 1-px band along every label edge with 255 (the object side; between
two objects the higher class id's side), like the VOC boundary (about 1 % of the image
width in both), so evaluation ignores the exact contour. Image-level labels are
derived from the masks: a class is present when at least one of its pixels is visible.
Placement keeps at least 40 % of every earlier object and 50 % of its part visible.

Geometry is expressed relative to the image size, so the ``tiny`` config (48 px, used by the
tests) is a downscaled version of ``demo`` (96 px). ``docs/synthetic_dataset.md`` has the
full description.
"""

from __future__ import annotations

import colorsys
import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pmm_jax.constants import IGNORE_LABEL, SYNTHETIC_CLASSES
from pmm_jax.data.builder_base import labels_from_mask

NUM_CLASSES = len(SYNTHETIC_CLASSES) - 1

# Saturated part colours, one per foreground class (RGB, 0..255).
PART_COLOURS = np.array(
    [[225, 35, 35], [245, 215, 30], [30, 205, 235], [215, 40, 200], [40, 200, 60]],
    dtype=np.float32,
)
# Small per-class hue offsets on the shared body hue range: the colour distributions overlap.
_BODY_HUE_SHIFT = (-0.015, -0.0075, 0.0, 0.0075, 0.015)
_BODY_TEXTURE_AMPLITUDE = 0.07
_OBJECT_RADIUS = (0.28, 0.4)  # fraction of the image size
_RADIUS_SCALE = (1.0, 0.8, 0.68)  # smaller objects when there are 2 or 3, so they fit
_NUM_OBJECTS_P = (0.3, 0.4, 0.3)  # probabilities of 1, 2, 3 objects
_PARTNER = (0, 2, 1, 4, 3, 1)  # indexed by class id 1..5: the class it co-occurs with
_P_PARTNER = 0.6
_P_NEAR = 0.75  # chance that a further object is placed against an earlier one
_MIN_VISIBLE = 0.4  # fraction of an earlier object that must stay visible
_MIN_PART_VISIBLE = 0.5
_PLACEMENT_TRIES = 20
_NOISE_STD = 4.0

Shape = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# --- Shapes: (u, v) are object coordinates in units of the object radius. -----------------
# Each returns (object, part) boolean maps; the part lies inside the object.

def _ring(u, v, rng):
    rho = np.hypot(u, v)
    body = (rho < 1.0) & (rho > 0.55)
    return body, body & (np.hypot(u - 0.78, v) < 0.24)


def _kite(u, v, rng):
    arm = np.where(u >= 0, u / 1.0, -u / 0.6)
    body = arm + np.abs(v) / 0.55 < 1.0
    return body, np.hypot(u - 0.5, v) < 0.17


def _comet(u, v, rng):
    head = np.hypot(u, v) < 0.42
    tail = (u < 0) & (u > -1.3) & (np.abs(v) < 0.42 * (1.0 + u / 1.3))
    return head | tail, np.hypot(u, v) < 0.18


def _bar(u, v, rng):
    body = (np.abs(u) < 1.0) & (np.abs(v) < 0.28)
    return body, body & (u > 0.78)


def _blob(u, v, rng):
    phase = rng.uniform(0, 2 * np.pi, size=2)
    angle = np.arctan2(v, u)
    radius = 0.75 * (1 + 0.18 * np.sin(3 * angle + phase[0]) + 0.08 * np.sin(5 * angle + phase[1]))
    return np.hypot(u, v) < radius, np.hypot(u + 0.25, v - 0.2) < 0.18


_SHAPES: tuple[Shape, ...] = (_ring, _kite, _comet, _bar, _blob)

# Weak body textures in [-1, 1] and strong part patterns in [0, 1], per class.
_BODY_TEXTURES = (
    lambda u, v: np.sin(2 * np.pi * 3.0 * np.hypot(u, v)),
    lambda u, v: np.sin(2 * np.pi * 2.5 * (u + v)),
    lambda u, v: np.sin(2 * np.pi * 4.0 * v),
    lambda u, v: np.sin(2 * np.pi * 3.0 * u),
    lambda u, v: np.sin(2 * np.pi * 2.5 * u) * np.sin(2 * np.pi * 2.5 * v),
)
_PART_PATTERNS = (
    lambda u, v: (np.hypot(u - 0.78, v) < 0.1).astype(np.float32),  # white-ish centre dot
    lambda u, v: ((np.floor(u * 12) + np.floor(v * 12)) % 2).astype(np.float32),  # checker
    lambda u, v: np.clip(1.0 - np.hypot(u, v) / 0.18, 0, 1),  # bright core
    lambda u, v: (np.floor(v * 14) % 2).astype(np.float32),  # stripes
    lambda u, v: (np.hypot(u + 0.25, v - 0.2) < 0.08).astype(np.float32),  # pupil
)


@dataclasses.dataclass
class _Object:
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float
    angle: float


# Every shape fits in a disc of this many radii around its centre (the comet tail is longest).
_EXTENT = 1.35


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _body_colour(rng: np.random.Generator, hue_shift: float = 0.0) -> np.ndarray:
    """The muted earthy colours shared by every class body and by the decoys."""
    hue = rng.uniform(0.05, 0.16) + hue_shift
    return _hsv(hue, rng.uniform(0.25, 0.45), rng.uniform(0.45, 0.75))


def _window(obj: _Object, size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The image window that can contain ``obj`` and object coordinates ``(u, v)`` over it.

    Working on the window instead of the whole image keeps rendering cost proportional to
    the object's area.
    """
    reach = _EXTENT * obj.radius
    x0, x1 = max(0, int(obj.centre[0] - reach)), min(size, int(obj.centre[0] + reach) + 1)
    y0, y1 = max(0, int(obj.centre[1] - reach)), min(size, int(obj.centre[1] + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xx - obj.centre[0], yy - obj.centre[1]
    cos, sin = np.cos(obj.angle), np.sin(obj.angle)
    u = (dx * cos + dy * sin) / obj.radius
    v = (-dx * sin + dy * cos) / obj.radius
    return (slice(y0, y1), slice(x0, x1)), u, v


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise: a (cells+1)^2 grid of N(0, 1) values, bilinearly upsampled."""
    coarse = rng.standard_normal(size=(cells + 1, cells + 1, channels), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    i0 = np.minimum(t.astype(np.int32), cells - 1)
    f = (t - i0)[:, None]
    rows = coarse[i0] * (1 - f[:, :, None]) + coarse[i0 + 1] * f[:, :, None]  # [size, cells+1, C]
    return rows[:, i0] * (1 - f.T[:, :, None]) + rows[:, i0 + 1] * f.T[:, :, None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted base colour of any hue, smooth colour drift and a weak oriented stripe texture."""
    base = _hsv(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75))
    image = base + 18.0 * _smooth_field(rng, size, cells=3, channels=3)
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 10)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    phase = coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)
    return image + rng.uniform(3, 10) * np.sin(2 * np.pi * cycles * phase)[:, :, None]


def _draw_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """2-4 background items: part-less class bodies (decoys) or body-coloured/muted ellipses."""
    size = image.shape[0]
    for _ in range(rng.integers(2, 5)):
        obj = _Object((rng.uniform(0, size), rng.uniform(0, size)),
                      size * rng.uniform(0.08, 0.2), rng.uniform(0, 2 * np.pi))
        window, u, v = _window(obj, size)
        if rng.random() < 0.35:
            cls = rng.integers(NUM_CLASSES)
            region, _ = _SHAPES[cls](u, v, rng)
            texture = _BODY_TEXTURES[cls](u, v)
        else:
            region = np.hypot(u, v * rng.uniform(1.0, 2.5)) < 1.0
            texture = np.sin(2 * np.pi * rng.uniform(1, 4) * u)
        colour = _body_colour(rng) if rng.random() < 0.6 else _hsv(
            rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.8))
        painted = colour * (1 + _BODY_TEXTURE_AMPLITUDE * texture[region][:, None])
        image[window][region] = painted


def _sample_classes(rng: np.random.Generator) -> list[int]:
    """1-3 class ids in 1..NUM_CLASSES; the second is often the first one's partner."""
    count = rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P) + 1
    classes = [int(rng.integers(1, NUM_CLASSES + 1)) for _ in range(count)]
    if count > 1 and rng.random() < _P_PARTNER:
        classes[1] = _PARTNER[classes[0]]
    return classes


def _propose(rng: np.random.Generator, size: int, scale: float, placed: list[_Object]) -> _Object:
    """A random pose; with probability _P_NEAR it overlaps the bounding circle of a placed one."""
    radius = size * scale * rng.uniform(*_OBJECT_RADIUS)
    if placed and rng.random() < _P_NEAR:
        anchor = placed[rng.integers(len(placed))]
        direction = rng.uniform(0, 2 * np.pi)
        distance = (anchor.radius + radius) * rng.uniform(0.45, 0.85)
        offset = distance * np.array([np.cos(direction), np.sin(direction)])
        centre = np.array(anchor.centre) + offset
    else:
        centre = rng.uniform(0, size, size=2)
    centre = np.clip(centre, 0.8 * radius, size - 0.8 * radius)  # keeps the part's centre inside
    return _Object((float(centre[0]), float(centre[1])), radius, rng.uniform(0, 2 * np.pi))


def _with_boundary(label: np.ndarray) -> np.ndarray:
    """Marks with 255 every pixel that has a 4-neighbour with a smaller label.

    That is a 1-px band on the object side of each object/background edge and on the
    higher class's side between two objects: no two differently labelled pixels touch.
    """
    edge = np.zeros(label.shape, dtype=bool)
    edge[1:] |= label[1:] > label[:-1]
    edge[:-1] |= label[:-1] > label[1:]
    edge[:, 1:] |= label[:, 1:] > label[:, :-1]
    edge[:, :-1] |= label[:, :-1] > label[:, 1:]
    return np.where(edge, IGNORE_LABEL, label).astype(np.uint8)


def _lost_pixels(owner_window: np.ndarray, region: np.ndarray, count: int) -> np.ndarray:
    """How many visible pixels each of ``count`` placed objects loses under ``region``."""
    covered = owner_window[region]
    return np.bincount(covered[covered >= 0], minlength=count)


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders one image and its mask.

    Returns ``image`` uint8 ``[size, size, 3]`` and ``mask`` uint8 ``[size, size]`` with 0 for
    background, 1..5 for the classes of ``SYNTHETIC_CLASSES`` and 255 on object boundaries.
    The result depends only on the state of ``rng``; there is always at least one object.
    Objects are drawn in order, each on top of the earlier ones; a pose is accepted only if
    every earlier object keeps ``_MIN_VISIBLE`` of its pixels and ``_MIN_PART_VISIBLE`` of
    its part (the first object is always accepted).
    """
    image = _background(rng, size)
    _draw_clutter(rng, image)

    owner = np.full((size, size), -1, dtype=np.int32)  # visible object index per pixel
    part_owner = np.full((size, size), -1, dtype=np.int32)
    label = np.zeros((size, size), dtype=np.int32)
    placed: list[_Object] = []
    visible = np.zeros(0, dtype=np.int64)  # visible pixels per placed object
    visible_part = np.zeros(0, dtype=np.int64)
    classes = _sample_classes(rng)
    scale = _RADIUS_SCALE[len(classes) - 1]
    for cls in classes:
        for _ in range(_PLACEMENT_TRIES):
            obj = _propose(rng, size, scale, placed)
            window, u, v = _window(obj, size)
            region, part = _SHAPES[cls - 1](u, v, rng)
            lost = _lost_pixels(owner[window], region, len(placed))
            lost_part = _lost_pixels(part_owner[window], region, len(placed))
            if region.any() and np.all(visible - lost >= _MIN_VISIBLE * visible) and np.all(
                    visible_part - lost_part >= _MIN_PART_VISIBLE * visible_part):
                break
        else:
            continue  # no pose leaves the earlier objects visible enough: skip this object
        body_rgb = _body_colour(rng, _BODY_HUE_SHIFT[cls - 1])
        texture = _BODY_TEXTURES[cls - 1](u, v)[:, :, None]
        body = body_rgb * (1 + _BODY_TEXTURE_AMPLITUDE * texture)
        part_rgb = np.clip(PART_COLOURS[cls - 1] + rng.uniform(-15, 15, size=3), 0, 255)
        pattern = _PART_PATTERNS[cls - 1](u, v)[:, :, None]
        part_look = part_rgb * 0.65 + pattern * (0.35 * part_rgb + 0.25 * (255 - part_rgb))
        image[window][region] = np.where(part[:, :, None], part_look, body)[region]
        index = len(placed)
        owner[window][region] = index
        label[window][region] = cls
        part_owner[window][region] = -1
        part_owner[window][part] = index
        placed.append(obj)
        visible = np.append(visible - lost, region.sum())
        visible_part = np.append(visible_part - lost_part, part.sum())

    # Uniform noise with the same std as N(0, _NOISE_STD^2): several times cheaper to draw.
    image += (_NOISE_STD * np.sqrt(12.0)) * (rng.random(size=image.shape, dtype=np.float32) - 0.5)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), _with_boundary(label)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Image side (pixels), split sizes and the seed every example's generator derives from."""

    image_size: int = 96
    num_train: int = 1000
    num_val: int = 200
    seed: int = 0


_SPLIT_CODES = {"train": 0, "val": 1}


class SyntheticWsss(tfds.core.GeneratorBasedBuilder):
    """Procedural weakly-supervised segmentation dataset; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="demo", description="96x96 images, 1000 train, 200 val.",
                        image_size=96, num_train=1000, num_val=200),
        SyntheticConfig(name="tiny", description="48x48 images, 64 train, 32 val (tests).",
                        image_size=48, num_train=64, num_val=32),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. tfds's default lookup imports the ``importlib_resources`` backport, which
        tfds 4.9.x only declares for Python < 3.9 (tensorflow/datasets#11212)."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Image(shape=(size, size, 3)),
                "mask": tfds.features.Image(shape=(size, size, 1)),
                "labels": tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.float32),
            }),
            supervised_keys=None,
            disable_shuffling=True,  # keep examples in id order: shards are contiguous id ranges
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "val": self._generate_examples("val", config.num_val),
        }

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for index in range(count):
            rng = np.random.default_rng((config.seed, _SPLIT_CODES[split], index))
            image, mask = render_sample(rng, config.image_size)
            image_id = f"{split}_{index:06d}"
            yield image_id, {
                "id": image_id,
                "image": image,
                "mask": mask[:, :, None],
                "labels": labels_from_mask(mask, NUM_CLASSES),
            }
