"""`python -m pmm_jax.evaluate`: the command-line layer (flags, messages, exit codes) over
``pmm_jax.scoring``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from pmm_jax.constants import CLASS_NAMES
from pmm_jax.files import safe_io
from pmm_jax.scoring import (
    RULES,
    class_names_for,
    evaluate_dirs,
    format_table,
    ignored_classes,
    read_ids,
)


def _define_flags() -> None:
    """CLI flags; defined only when run as a script so importing this module adds none."""
    from absl import flags

    flags.DEFINE_string("pred_dir", None, "Folder of predicted <id>.png label maps.", required=True)
    flags.DEFINE_string("gt_dir", None, "Folder of ground-truth <id>.png label maps.", required=True)
    flags.DEFINE_string("ids", None, "Text file of the ids to score, one per line (e.g. "
                        "VOC2012/ImageSets/Segmentation/val.txt); default: every file of --gt_dir.")
    flags.DEFINE_integer("num_classes", 21, "Number of classes including background.")
    flags.DEFINE_enum("rule", "mmseg", RULES, "Which classes enter the mean IoU.")
    flags.DEFINE_string("out_json", None, "Optional JSON file for the results.")
    flags.DEFINE_enum("class_names", None, sorted(CLASS_NAMES), "Class names for the table.")
    flags.DEFINE_list("ignore_classes", [], "Class indices always left out of the mean "
                      "(added to those of --class_names, e.g. coco91's unused ids).")

def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        if f.num_classes < 1:
            raise ValueError(f"--num_classes={f.num_classes} must be >= 1")
        names = class_names_for(f.num_classes, f.class_names)
        ignore = sorted(set(ignored_classes(f.class_names))
                        | set(_parse_ignore_classes(f.ignore_classes, f.num_classes)))
        ids = read_ids(f.ids) if f.ids else None
        result = evaluate_dirs(f.pred_dir, f.gt_dir, f.num_classes, f.rule, ignore, ids)
    except ValueError as err:
        sys.exit(f"error: {err}")
    print(f"{result['num_images']} images, rule {f.rule}"
          + (f", ignored classes {ignore}" if ignore else ""))
    print(format_table(result["iou"], result["miou"], names))
    if f.out_json:
        _write_report(f.out_json, {
            "pred_dir": f.pred_dir,
            "gt_dir": f.gt_dir,
            "rule": f.rule,
            "ignored_classes": ignore,
            "num_images": result["num_images"],
            "miou": None if np.isnan(result["miou"]) else result["miou"],
            "iou": {n: None if np.isnan(v) else float(v) for n, v in zip(names, result["iou"])},
            "confusion": result["confusion"].tolist(),
        })

def _parse_ignore_classes(values: Sequence[str], num_classes: int) -> list[int]:
    """``--ignore_classes`` as class indices; a ValueError naming the flag unless each is an
    integer in ``0..num_classes-1``."""
    classes = []
    for value in values:
        try:
            classes.append(int(value))
        except ValueError:
            raise ValueError(f"--ignore_classes: {value!r} is not a class index") from None
        if not 0 <= classes[-1] < num_classes:
            raise ValueError(f"--ignore_classes: {value} is outside 0..{num_classes - 1} "
                             f"(--num_classes={num_classes})")
    return classes

def _write_report(path: str, report: dict) -> None:
    """Writes the JSON report; exits with an error naming ``--out_json`` if it cannot."""
    try:
        safe_io.write_json(path, report)
    except OSError as err:
        sys.exit(f"error: --out_json={path}: cannot write the report "
                 f"({type(err).__name__}: {err.strerror or err}); the table above is complete")

if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
