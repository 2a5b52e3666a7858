"""`python -m pmm_jax.pseudo_masks`: the command-line layer (flags, messages, exit codes) over
``pmm_jax.masks.generator``.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from pmm_jax.masks.generator import METHODS, PseudoMaskError, default_config, generate

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
CAM_SUFFIXES = (".npy", ".npz")


def list_records(cam_dir: str, image_dir: str) -> list[tuple[str, str, str]]:
    """``(id, image path, CAM path)`` for every ``<id>.npy``/``<id>.npz`` of ``cam_dir``.

    The image is ``image_dir/<id>.jpg`` (or ``.png``, ``.jpeg``). CAM files without an image
    are an error listing them, raised before any work starts, and so is a folder that is
    missing or not a folder.
    """
    for flag, folder in (("--cam_dir", cam_dir), ("--image_dir", image_dir)):
        if not os.path.isdir(folder):
            raise ValueError(f"{flag}={folder}: "
                             + ("not a directory" if os.path.exists(folder) else "does not exist"))
    cams: dict[str, str] = {}
    for name in sorted(os.listdir(cam_dir)):
        image_id, suffix = os.path.splitext(name)
        if suffix in CAM_SUFFIXES:
            if image_id in cams:
                raise ValueError(f"{cam_dir}: two CAM files for {image_id}: "
                                 f"{os.path.basename(cams[image_id])} and {name}")
            cams[image_id] = os.path.join(cam_dir, name)
    if not cams:
        raise ValueError(f"{cam_dir}: no CAM files (<id>.npy or <id>.npz)")
    records, orphans = [], []
    for image_id, cam_path in cams.items():
        candidates = [os.path.join(image_dir, image_id + s) for s in IMAGE_SUFFIXES]
        image_path = next((p for p in candidates if os.path.exists(p)), None)
        if image_path is None:
            orphans.append(cam_path)
        else:
            records.append((image_id, image_path, cam_path))
    if orphans:
        raise ValueError(f"{len(orphans)} CAM file(s) have no image <id>.jpg/.png in {image_dir}: "
                         + ", ".join(orphans[:20]) + (" ..." if len(orphans) > 20 else ""))
    return records

def _define_flags() -> None:
    """CLI flags; defined only when run as a script so importing this module adds none."""
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("cam_dir", None, "Folder of <id>.npy / <id>.npz CAM files.", required=True)
    flags.DEFINE_string("image_dir", None, "Folder of <id>.jpg / <id>.png images.", required=True)
    flags.DEFINE_string("out_dir", None, "Output folder for <id>.png pseudo-masks.", required=True)
    flags.DEFINE_enum("method", None, METHODS, "Variant; overrides --config.method.")
    flags.DEFINE_integer("num_workers", None, "CRF processes; overrides --config.num_workers.")
    config_flags.DEFINE_config_dict("config", default_config(), lock_config=True)

def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    cfg = f.config
    if f.method is not None:
        cfg.method = f.method
    try:
        records = list_records(f.cam_dir, f.image_dir)
        stats = generate(records, f.out_dir, cfg, num_workers=f.num_workers)
    except PseudoMaskError as err:
        sys.exit(f"error: {err}\n" + _format_stats(err.stats))
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(_format_stats(stats))

def _format_stats(stats: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in stats.items())

if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
