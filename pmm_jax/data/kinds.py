"""The dataset kinds: the part of ``config.data.name`` before any ``/`` names one entry of
:data:`DATASET_KINDS`.

An entry (:class:`DatasetKind`) holds everything a kind is: how a run opens it, the class-name
lists a config may choose for it, its tfds builder, its name for ``python -m
pmm_jax.data.prepare --dataset``, and the ``config.data`` values a config of it starts from.
Built in: ``synthetic_wsss`` (generated on first use), ``voc2012_wsss`` and ``coco2014_wsss``
(built from the user's downloads by ``pmm_jax.data.prepare``), ``folder_wsss`` (a folder of
the user's tagged images). A new kind is its builder (on ``builder_base``) and one
``DATASET_KINDS.register(name, DatasetKind(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from pmm_jax.constants import CLASS_NAMES
from pmm_jax.data import builder_base, coco, folder, synthetic, voc
from pmm_jax.registry import Registry, UnknownNameError


@dataclasses.dataclass(frozen=True)
class DatasetKind:
    """One dataset kind.

    Attributes:
      open: ``open(data_config, data_dir) -> dict`` makes the dataset ready in ``data_dir``
        (the tfds data_dir) and returns at least ``name`` (the tfds name to read) and
        ``class_names`` (index 0 background); any other ``Dataset`` field it returns (e.g.
        ``val_split=None``) replaces the value taken from ``config.data``.
      defaults: the ``config.data`` values of a config of this kind (``data_config``).
      class_names: ``{name: classes}``, the lists ``config.data.class_names`` may name
        ({}: the kind declares its classes when opened).
      builder: the tfds builder class, whose declared features give the label count the
        config rules check (None: no fixed builder, e.g. a folder's).
      prepare: its ``--dataset`` name in ``python -m pmm_jax.data.prepare`` (None: it needs
        no preparation step).
      names: how ``config.data.name`` is spelt for it, for error messages.
    """

    open: Callable[[Any, str], dict]
    defaults: Mapping[str, Any]
    class_names: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    builder: type | None = None
    prepare: str | None = None
    names: str = ""


DATASET_KINDS: Registry[DatasetKind] = Registry("dataset kind")


def kind_name(data_config) -> str:
    """The kind of ``config.data``: ``config.data.name`` before any ``/``."""
    return data_config.name.split("/", 1)[0]


def kind_of(data_config) -> DatasetKind:
    """The entry of ``config.data``'s kind; ``UnknownNameError`` naming the key and listing
    the registered kinds otherwise."""
    try:
        return DATASET_KINDS.get(kind_name(data_config))
    except UnknownNameError as err:
        raise UnknownNameError(f"config.data.name={data_config.name!r}: {err}") from None


def class_name_lists() -> dict[str, tuple[str, ...]]:
    """Every class-name list any registered kind offers, by name."""
    return {name: classes for _, entry in DATASET_KINDS.items()
            for name, classes in entry.class_names.items()}


def data_config(kind: str, **overrides) -> dict[str, Any]:
    """The ``config.data`` section of a config of ``kind``: its defaults, then ``overrides``."""
    return {**DATASET_KINDS.get(kind).defaults, **overrides}


def open_tfds(data_config, data_dir: str) -> dict:
    """A tfds dataset of a builder kind, ``config.data.name``: generated into ``data_dir`` on
    first use when it needs no download, else required to be prepared there
    (``builder_base.DatasetNotPreparedError`` otherwise). Class names: the kind's list
    ``config.data.class_names``."""
    builder_base.prepare(data_config.name, data_dir)
    return {"name": data_config.name, "class_names": class_name_lists()[data_config.class_names]}


_SPLITS = dict(train_split="train", val_split="val", eval_pad_to=None)
DATASET_KINDS.register("synthetic_wsss", DatasetKind(
    open=open_tfds, builder=synthetic.SyntheticWsss, names="synthetic_wsss/<config>",
    class_names={"synthetic": CLASS_NAMES["synthetic"]},
    defaults=dict(name="synthetic_wsss/demo", class_names="synthetic", num_classes=6,
                  **_SPLITS)))
DATASET_KINDS.register("voc2012_wsss", DatasetKind(
    open=open_tfds, builder=voc.Voc2012Wsss, prepare="voc", names="voc2012_wsss",
    class_names={"voc": CLASS_NAMES["voc"]},
    defaults=dict(name="voc2012_wsss", class_names="voc", num_classes=21,
                  **{**_SPLITS, "train_split": "train_aug", "eval_pad_to": (512, 512)})))
DATASET_KINDS.register("coco2014_wsss", DatasetKind(
    open=open_tfds, builder=coco.Coco2014Wsss, prepare="coco", names="coco2014_wsss/<config>",
    class_names={"coco": CLASS_NAMES["coco"], "coco91": CLASS_NAMES["coco91"]},
    defaults=dict(name="coco2014_wsss/contiguous", class_names="coco", num_classes=81,
                  **{**_SPLITS, "eval_pad_to": (640, 640)})))
DATASET_KINDS.register("folder_wsss", DatasetKind(
    open=folder.open_folder, names="folder_wsss",
    defaults=dict(name="folder_wsss", class_names="", num_classes=0, **_SPLITS)))
