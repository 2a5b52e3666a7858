"""Every rule a pipeline config must satisfy, in one table, checked by ``main`` before any
stage runs.

A bad setting would otherwise surface hours later (``--config.eval.rule=foo`` only fails in
the eval stage, ``cls.crop_size=0`` as a diverged training run), so :func:`check` reports
every bad key at once, in one paragraph, before any work starts. ``RULES`` holds the
per-key rules (type, allowed values, range); a key a config does not have is skipped (older
configs lack optional keys; configs are locked, so a misspelt override never gets here).
``CROSS_RULES`` relate several keys: ``num_classes`` against the class names and the
dataset, a crop against its tile, the segmenter's starting point, the cyclic source, the
training stages' ImageNet weights. :func:`device_problems` holds the rules that need the
run's processes and devices, checked by ``main`` as soon as they are known (before any stage).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from pmm_jax.files.workdir import parse_stages

if TYPE_CHECKING:
    import ml_collections

Check = Callable[[Any], str | None]  # a value -> None when fine, else what it must be


class ConfigError(ValueError):
    """The config breaks one or more rules; the message lists every one (one paragraph)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def integer(least: int) -> Check:
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(least,
                                                                     f"an integer >= {least}")
    return lambda v: None if _is_int(v) and v >= least else f"must be {kind}"


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Check:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    text = ("a positive number" if (low, low_open, high) == (0, True, math.inf) else
            "a non-negative number" if (low, low_open, high) == (0, False, math.inf) else
            f"a number in {left}{low}, {high}{right}")

    def check(v):
        ok = _is_number(v) and (v > low if low_open else v >= low) and (
            v < high if high_open else v <= high)
        return None if ok else f"must be {text}"
    return check


POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, high_open=True)


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def text(v) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def one_of(*allowed) -> Check:
    shown = ", ".join(repr(a) for a in allowed)
    return lambda v: None if v in allowed else f"is not one of the allowed values: {shown}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else (
        None if check(v) is None else f"{check(v)} or None")


def sequence(check: Check, *, length: int | None = None, least: int = 1) -> Check:
    """A list/tuple (``length`` items, or at least ``least``) whose items pass ``check``."""
    def run(v):
        what = f"{length} items" if length else f"at least {least} item(s)"
        if not isinstance(v, (list, tuple)) or (len(v) != length if length else len(v) < least):
            return f"must be a list of {what}"
        bad = [item for item in v if check(item) is not None]
        return f"has items that {check(bad[0])}: {bad}" if bad else None
    return run


def scale_range(v) -> str | None:
    if v is None:
        return None
    problem = sequence(POSITIVE, length=2)(v)
    return problem or (None if v[0] <= v[1] else "must be (low, high) with low <= high")


def _stages(v) -> str | None:
    try:
        parse_stages(v) if isinstance(v, str) else None
    except ValueError as err:
        return f"is not a stage list ({err})"
    return None if isinstance(v, str) else "must be a comma-separated string of stages"


def _rules() -> dict[str, Check]:
    """``{key: check}``; ``*.name`` applies to ``name`` in every section."""
    from pmm_jax.cams.classifier import CLASSIFIERS
    from pmm_jax.cams.methods import CAM_METHODS
    from pmm_jax.data.kinds import class_name_lists
    from pmm_jax.masks.dense_crf import BACKENDS
    from pmm_jax.masks.variants import VARIANTS
    from pmm_jax.segmentation.losses import SEG_LOSSES
    from pmm_jax.segmentation.pus import PUS_MODES, PUS_REDUCTIONS
    from pmm_jax.scoring import RULES as IOU_RULES
    from pmm_jax.training.precision import COMPUTE_DTYPES

    positive_int, non_negative_int = integer(1), integer(0)
    pair = sequence(positive_int, length=2)
    return {
        "seed": non_negative_int, "stages": _stages, "allow_random_init": boolean,
        "compute_dtype": one_of(*COMPUTE_DTYPES), "compilation_cache": text,
        "plugins": text,
        "*.batch_size": positive_int, "*.num_steps": positive_int, "*.log_every": positive_int,
        "*.ckpt_every": positive_int, "*.tile_batch": positive_int, "*.crop_size": positive_int,
        "*.eval_every": non_negative_int, "*.eval_subset": non_negative_int,
        "*.val_subset": non_negative_int, "*.crf_workers": non_negative_int,
        "*.scale_range": scale_range, "*.lr": POSITIVE, "*.min_lr": NON_NEGATIVE,
        "*.momentum": FRACTION, "*.weight_decay": NON_NEGATIVE,
        "*.model.dropout": FRACTION, "*.model.remat": boolean, "*.model.init_from": text,
        "*.multicrop.scales": sequence(POSITIVE), "*.multicrop.crop": positive_int,
        "*.multicrop.stride": positive_int,
        "data.name": text, "data.data_dir": text,
        # "" and 0: the dataset declares its classes (a folder); _num_classes checks the rest
        "data.class_names": one_of(*class_name_lists(), ""), "data.num_classes": integer(0),
        "data.train_split": text,
        "data.val_split": optional(text), "data.eval_pad_to": optional(pair),
        "data.shuffle_buffer": optional(positive_int),
        "data.max_side": non_negative_int,  # 0: a folder's images kept at their size
        "cls.method": one_of(*CLASSIFIERS.names()), "cls.official_momentum": boolean,
        "cls.multicrop.rough_masks": text,
        "cam.method": one_of(*CAM_METHODS.names()), "cam.scales": sequence(POSITIVE),
        "cam.flip": boolean,
        "crf.backend": one_of(*BACKENDS),
        "pseudo.variants": sequence(VARIANTS.check),
        "pseudo.train_on": VARIANTS.check, "pseudo.eval_split": text,
        "pseudo.alpha": POSITIVE, "pseudo.t": NON_NEGATIVE, "pseudo.s": NON_NEGATIVE,
        "pseudo.official_minmax": boolean, "pseudo.num_workers": non_negative_int,
        "pseudo.crf.gauss_sxy": POSITIVE, "pseudo.crf.gauss_compat": POSITIVE,
        "pseudo.crf.bilateral_sxy": POSITIVE, "pseudo.crf.bilateral_srgb": POSITIVE,
        "pseudo.crf.bilateral_compat": POSITIVE, "pseudo.crf.iterations": non_negative_int,
        "seg.runs": sequence(one_of(*SEG_LOSSES.names())), "seg.aux_weight": NON_NEGATIVE,
        "seg.pus.mode": one_of(*PUS_MODES), "seg.pus.reduction": one_of(*PUS_REDUCTIONS),
        "seg.pus.beta": POSITIVE, "seg.pus.kappa": POSITIVE,
        "seg.augment": one_of("light", "mmseg"), "seg.img_scale": pair,
        "seg.cat_max_ratio": number(0, 1, low_open=True),
        "seg.model.init_from_cls": boolean, "seg.model.channels": positive_int,
        "seg.model.aux_channels": positive_int, "seg.model.bins": sequence(positive_int),
        "cycle.num_cycles": non_negative_int, "cycle.source": text,
        "cycle.loss": one_of(*SEG_LOSSES.names()),
        "eval.rule": one_of(*IOU_RULES), "eval.crf": boolean, "eval.flip": boolean,
        "eval.scales": sequence(POSITIVE), "eval.sliding_window": optional(pair),
    }


_MISSING = object()


def _flat(config) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of the config (sections flattened)."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if hasattr(value, "items"):
                walk(f"{path}.", value)
            else:
                out[path] = value
    walk("", config)
    return out


def _matches(pattern: str, key: str) -> bool:
    return key.endswith(pattern[1:]) if pattern.startswith("*.") else key == pattern


def _get(config, key: str, default=_MISSING):
    node = config
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            return default
        node = node[part]
    return node


# --- rules relating several keys -------------------------------------------------------------

def dataset_labels(name: str) -> int | None:
    """The image-level label count of tfds dataset ``name`` (its builder registered with tfds:
    a ``pmm_jax.data.kinds`` entry's) from its declared features (nothing is read or
    prepared: the builder looks into an empty folder); None when it has no ``labels``
    feature. ``LookupError`` for a name tfds does not know."""
    import tempfile

    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory() as empty:
        try:
            builder = tfds.builder(name, data_dir=empty, try_gcs=False)
        except Exception as err:  # tfds's DatasetNotFoundError and config-name errors
            raise LookupError(str(err).splitlines()[0]) from err
        labels = builder.info.features["labels"] if "labels" in builder.info.features else None
    return None if labels is None else int(labels.shape[-1])


def _num_classes(config) -> list[str]:
    num, names = _get(config, "data.num_classes"), _get(config, "data.class_names")
    name = _get(config, "data.name")
    if not isinstance(name, str):
        return []
    from pmm_jax.data import kinds

    lists = kinds.class_name_lists()
    problems = []
    if _is_int(num) and names in lists and len(lists[names]) != num:
        problems.append(f"config.data.num_classes={num} but config.data.class_names={names!r} "
                        f"names {len(lists[names])} classes (background included)")
    try:
        entry = kinds.kind_of(config.data)
    except ValueError as err:
        return [*problems, str(err)]
    if entry.builder is None or not _is_int(num):
        return problems  # other kinds declare their classes when opened
    if names == "" or num < 2:
        return [*problems, f"config.data.name={name!r} takes its classes from the config: set "
                f"config.data.class_names (one of {', '.join(map(repr, entry.class_names))}) "
                "and config.data.num_classes (2 or more, background included)"]
    try:
        labels = dataset_labels(name)
    except LookupError:
        problems.append(f"config.data.name={name!r} is not a dataset of kind "
                        f"{kinds.kind_name(config.data)} ({entry.names})")
    else:
        if labels is not None and labels + 1 != num:
            problems.append(f"config.data.num_classes={num} but dataset {name} has "
                            f"{labels + 1} classes (background included): set "
                            f"--config.data.num_classes={labels + 1}")
    return problems


def _tiles(config) -> list[str]:
    problems = []
    for section in ("cls.multicrop", "cam.multicrop"):
        crop, stride = _get(config, f"{section}.crop"), _get(config, f"{section}.stride")
        if _is_int(crop) and _is_int(stride) and stride > crop:
            problems.append(f"config.{section}.stride={stride} is larger than its crop={crop} "
                            "(tiles would leave gaps)")
    window = _get(config, "eval.sliding_window")
    if isinstance(window, (list, tuple)) and len(window) == 2 and all(map(_is_int, window)):
        if window[1] > window[0]:
            problems.append(f"config.eval.sliding_window={tuple(window)}: the stride is larger "
                            "than the crop (windows would leave gaps)")
        pad = _get(config, "data.eval_pad_to")
        if isinstance(pad, (list, tuple)) and len(pad) == 2 and window[0] > max(pad):
            problems.append(f"config.eval.sliding_window crop {window[0]} is larger than "
                            f"config.data.eval_pad_to={tuple(pad)}")
    return problems


# Backbone options that do not change its weights' shapes (a copy between them is fine).
_WEIGHTLESS_BACKBONE_KEYS = ("frozen_stages", "remat")


def _segmenter_start(config) -> list[str]:
    if not _get(config, "seg.model.init_from_cls", False):
        return []
    if _get(config, "seg.model.init_from", ""):
        return ["config.seg.model.init_from and config.seg.model.init_from_cls are both set; "
                "choose one starting point for the segmenter backbone"]
    cls_backbone, seg_backbone = (_get(config, "cls.model.backbone", None),
                                  _get(config, "seg.model.backbone", None))
    if not (hasattr(cls_backbone, "items") and hasattr(seg_backbone, "items")):
        return []
    differ = sorted(k for k in set(cls_backbone) & set(seg_backbone)
                    if k not in _WEIGHTLESS_BACKBONE_KEYS
                    and _flat({"v": cls_backbone[k]}) != _flat({"v": seg_backbone[k]}))
    if differ:
        return [f"config.seg.model.init_from_cls copies the classifier's backbone, but "
                f"config.seg.model.backbone differs from config.cls.model.backbone in "
                f"{', '.join(differ)}; make them equal or set init_from_cls=False"]
    return []


def _cycle_source(config) -> list[str]:
    source, runs = _get(config, "cycle.source"), _get(config, "seg.runs")
    cycles = _get(config, "cycle.num_cycles", 0)
    if (_is_int(cycles) and cycles > 0 and isinstance(runs, (list, tuple))
            and source not in runs):
        return [f"config.cycle.source={source!r} is not one of config.seg.runs={list(runs)} "
                "(the first cycle predicts with that segmenter)"]
    return []


def _initial_weights(config) -> list[str]:
    try:
        check_random_init(config)
    except ValueError as err:
        return [str(err)]
    return []


# The model config that each training stage initialises from ``<key>.model.init_from``.
TRAINS_FROM = {"cls": "cls", "seg": "seg", "cycle": "seg"}
MODEL_NAMES = {"cls": "classifier", "seg": "segmenter"}


def has_initial_weights(section: ml_collections.ConfigDict) -> bool:
    """Whether a model section starts from trained weights: converted ImageNet weights
    (``model.init_from``) or, for the segmenter, the cls stage's backbone (``init_from_cls``)."""
    return bool(section.model.get("init_from") or section.model.get("init_from_cls"))


def check_random_init(config: ml_collections.ConfigDict) -> None:
    """Refuses (ValueError) to train the classifier or the segmenter from random weights.

    A selected stage of ``TRAINS_FROM`` whose ``config.<cls|seg>.model.init_from`` is empty
    would train from random weights, which the paper never does and which is far from its
    results; that is allowed only with ``config.allow_random_init = True`` (the demo configs).
    The error names the keys and says how to get and convert ImageNet weights.
    """
    if config.get("allow_random_init", False):
        return
    keys = sorted({TRAINS_FROM[name] for name in parse_stages(config.stages)
                   if name in TRAINS_FROM and not has_initial_weights(config[TRAINS_FROM[name]])})
    if not keys:
        return
    steps = []
    for key in keys:
        arch = config[key].model.backbone.name
        structure = f" --structure=PATH/{arch}.json" if arch.startswith("scalenet") else ""
        steps.append(f"python -m pmm_jax.convert --arch={arch} --src=IMAGENET_WEIGHTS.pth"
                     f"{structure} --out=DIR, then --config.{key}.model.init_from=DIR")
    raise ValueError(
        f"{' and '.join(f'config.{k}.model.init_from' for k in keys)} "
        f"{'is' if len(keys) == 1 else 'are'} empty: the "
        f"{' and the '.join(MODEL_NAMES[k] for k in keys)} would train from random weights, "
        "which the paper never does. Get the ImageNet weights and convert them: "
        + "; ".join(steps) + ". See README.md, section 'ImageNet weights'. To train from "
        "random weights anyway, set --config.allow_random_init=True.")


CROSS_RULES: tuple[Callable[[Any], list[str]], ...] = (
    _num_classes, _tiles, _segmenter_start, _cycle_source, _initial_weights)


def device_problems(config, *, processes: int, local_devices: int) -> list[str]:
    """The rules that depend on the run's processes and devices (known once they have started,
    still before any stage): every global batch size splits evenly over all devices (each
    process's share over its local devices), the multi-crop tile batch over all devices, and
    a ``seg.val_subset`` gives every process at least one image."""
    found, devices = [], processes * local_devices
    for key, value in _flat(config).items():
        if key.endswith(".batch_size") and _is_int(value) and value > 0 and value % devices:
            found.append(f"config.{key}={value} must be a multiple of {devices} ({local_devices} "
                         f"local device(s) x {processes} process(es)): each process takes an "
                         "equal share and splits it over its devices (more chips than the "
                         "batch: the config's pod<chips> variant, e.g. "
                         f"--config=configs/voc.py:pod{devices}, docs/pod_scale.md)")
    tile_batch = _get(config, "cam.multicrop.tile_batch")
    if (_get(config, "cam.method", "multiscale") == "multicrop" and _is_int(tile_batch)
            and tile_batch > 0 and tile_batch % devices):
        found.append(f"config.cam.multicrop.tile_batch={tile_batch} must be a multiple of the "
                     f"number of devices ({devices})")
    subset = _get(config, "seg.val_subset", 0)
    if _get(config, "seg.eval_every", 0) and _is_int(subset) and 0 < subset < processes:
        found.append(f"config.seg.val_subset={subset}: each of the {processes} processes "
                     "validates on its share of these images, so use at least one per process "
                     "(or 0: all of val)")
    return found


def dataset_problems(config, data) -> list[str]:
    """The split names of ``config`` that the opened dataset ``data`` (``data.dataset``)
    lacks: its train and val splits and ``pseudo.eval_split`` (unless optional for it).
    Checked by ``main`` once the dataset is open, before any stage."""
    splits = data.dataset_splits
    found = []
    for key, value in (("data.train_split", data.train_split), ("data.val_split", data.val_split),
                       ("pseudo.eval_split", _get(config, "pseudo.eval_split", None))):
        if (isinstance(value, str) and value.split("[", 1)[0] not in splits
                and value not in data.optional_splits):
            found.append(f"config.{key}={value!r} is not a split of dataset {data.name} (its "
                         f"splits: {', '.join(splits)})")
    return found


def check_dataset(config, data) -> None:
    """Raises :class:`ConfigError` listing every :func:`dataset_problems` in one paragraph."""
    _raise(dataset_problems(config, data))


def check_devices(config, *, processes: int, local_devices: int) -> None:
    """Raises :class:`ConfigError` listing every :func:`device_problems` in one paragraph."""
    _raise(device_problems(config, processes=processes, local_devices=local_devices))


def problems(config) -> list[str]:
    """Every rule the config breaks, each as ``config.KEY=VALUE <what it must be>``."""
    rules = _rules()
    found = []
    for key, value in _flat(config).items():
        for pattern, check in rules.items():
            if _matches(pattern, key):
                problem = check(value)
                if problem:
                    found.append(f"config.{key}={value!r} {problem}")
                break
    if not any(p.startswith("config.stages=") for p in found):
        for rule in CROSS_RULES:
            found.extend(rule(config))
    return found


def check(config) -> None:
    """Raises :class:`ConfigError` listing every broken rule in one paragraph."""
    _raise(problems(config))


def _raise(found: list[str]) -> None:
    if len(found) == 1:
        raise ConfigError(found[0])
    if found:
        raise ConfigError(f"{len(found)} config settings are wrong: " + "; ".join(found)
                          + ". Fix them with --config.KEY=VALUE (or in the config file).")
