r"""Builds a WSSS dataset from archives the user downloaded and extracted (no network).

    python -m pmm_jax.data.prepare --dataset=voc --manual_dir=~/data/voc --data_dir=~/tfds
    python -m pmm_jax.data.prepare --dataset=coco --config=contiguous \
        --manual_dir=~/data/coco --data_dir=~/tfds

``--dataset=voc`` builds ``voc2012_wsss`` (``pmm_jax/data/voc.py``), ``--dataset=coco`` builds
``coco2014_wsss/<config>`` (``pmm_jax/data/coco.py``); ``docs/datasets.md`` shows the
folder trees each expects. Bad input stops with a message naming the folder, file or id
(exit status 2); ``--skip_corrupt`` leaves out images that do not decode and reports how
many. Running it again on a prepared dataset does nothing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import tensorflow_datasets as tfds

from pmm_jax.data.builder_base import InputError, ManualBuilder
from pmm_jax.data.kinds import DATASET_KINDS
from pmm_jax.files.locks import data_dir_lock


def builders() -> dict[str, type[ManualBuilder]]:
    """``{--dataset name: builder}`` of every dataset kind with a preparation step."""
    return {entry.prepare: entry.builder for _, entry in DATASET_KINDS.items() if entry.prepare}


def prepare(dataset: str, manual_dir: str, data_dir: str, *, config: str | None = None,
            skip_corrupt: bool = False) -> ManualBuilder:
    """Generates ``dataset`` ("voc" or "coco") into ``data_dir`` unless it is there already.

    Returns the builder; its ``skipped_corrupt`` lists the images left out this run.
    Raises :class:`builder_base.InputError` (with the expected folder tree when a folder is missing).
    """
    builder_cls = builders()[dataset]
    if not pathlib.Path(manual_dir).is_dir():
        raise InputError(f"--manual_dir={manual_dir} is not a folder.\n\nExpected layout:\n"
                             f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if not any(pathlib.Path(manual_dir).iterdir()):
        raise InputError(f"--manual_dir={manual_dir} is empty: extract the downloaded "
                         "archives into it.\n\nExpected layout:\n"
                         f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    with data_dir_lock(data_dir):  # two preparations sharing data_dir: the second waits
        builder = builder_cls(data_dir=data_dir, config=config, skip_corrupt=skip_corrupt)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
    return builder


def dataset_name(builder: tfds.core.DatasetBuilder) -> str:
    """The name to put in a config's ``data.name`` (``tfds.builder`` syntax, no version)."""
    config = builder.builder_config
    return f"{builder.name}/{config.name}" if config else builder.name


def summary(builder: ManualBuilder) -> str:
    """What was built: name, location, examples per split and the corrupt images skipped."""
    splits = ", ".join(f"{name} {info.num_examples}" for name, info in sorted(builder.info.splits.items()))
    lines = [f"{dataset_name(builder)} in {builder.data_dir}: {splits}"]
    skipped = sorted(builder.skipped_corrupt)
    if skipped:
        shown = "".join(f"\n  {path}" for path in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        lines.append(f"skipped {len(skipped)} corrupt image file(s), left out of every split "
                     f"listing them:{shown}{more}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pmm_jax.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(builders()))
    parser.add_argument("--manual_dir", required=True, type=os.path.expanduser,
                        help="folder holding the extracted archives (see docs/datasets.md)")
    parser.add_argument("--data_dir", required=True, type=os.path.expanduser,
                        help="tensorflow-datasets data_dir to write")
    parser.add_argument("--config", default=None,
                        help="builder config; coco: 'original' (default) or 'contiguous'")
    parser.add_argument("--skip_corrupt", action="store_true",
                        help="leave out images that do not decode instead of stopping")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 done, 2 bad input)."""
    args = parse_args(argv)
    try:
        builder = prepare(args.dataset, args.manual_dir, args.data_dir, config=args.config,
                          skip_corrupt=args.skip_corrupt)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
