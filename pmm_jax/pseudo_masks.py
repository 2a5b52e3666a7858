"""`python -m pmm_jax.pseudo_masks`: the command-line layer (flags, messages, exit codes) over
``pmm_jax.masks.generator``, for every method: the paper's four variants and the rough masks
of multi-crop training.

From folders (images ``<id>.jpg``/``.png`` and CAM files ``<id>.npy``/``.npz``)::

    python -m pmm_jax.pseudo_masks --cam_dir=CAMS --image_dir=IMAGES --out_dir=OUT \
        [--method=ppmg|baseline|crf_cvs|ppmg_no_cvs|rough] [--num_workers=N] \
        [--plugins=MODULES] [--config.crf.backend=pydensecrf|jax] \
        [--config.alpha=11 --config.t=0.05 --config.crf.bilateral_srgb=13 ...]

From a run: the train split of its config's dataset and ``WORKDIR/cams/train`` (the rough
masks of PMM's multi-crop recipe, docs/multicrop.md, written to ``WORKDIR/rough_masks/train``;
other methods to ``WORKDIR/pseudo/<method>/train``; ``--cam_dir``/``--out_dir`` elsewhere);
``num_classes`` is the dataset's::

    python -m pmm_jax.pseudo_masks --method=rough --run_config=configs/voc.py --workdir=W1
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from pmm_jax import registry
from pmm_jax.masks.generator import PseudoMaskError, dataset_records, default_config, generate
from pmm_jax.masks.variants import VARIANTS

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


def run_records(run_config, wd, cam_dir: str | None):
    """The records of a run's train split, its CAM files in ``cam_dir``, else
    ``WORKDIR/cams/train`` (``wd``: a ``files.workdir.Workdir``)."""
    from pmm_jax.data.dataset import open_dataset  # TensorFlow: only for this source

    examples = open_dataset(run_config, wd).examples("train", all_processes=True)
    return dataset_records(examples, cam_dir or wd.cams("train"))


def _define_flags() -> None:
    """CLI flags; defined only when run as a script so importing this module adds none."""
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("cam_dir", None, "Folder of <id>.npy / <id>.npz CAM files "
                        "(default with --run_config: WORKDIR/cams/train).")
    flags.DEFINE_string("image_dir", None, "Folder of <id>.jpg / <id>.png images.")
    flags.DEFINE_string("out_dir", None, "Output folder for <id>.png masks (default with "
                        "--run_config: WORKDIR/rough_masks/train or WORKDIR/pseudo/METHOD/train).")
    flags.DEFINE_string("method", None, f"Variant ({', '.join(VARIANTS.names())}, or one a "
                        "--plugins module registers); overrides --config.method.")
    flags.DEFINE_string("plugins", "", "Comma-separated modules to import first, which register "
                        "more variants (pmm_jax/registry.py).")
    flags.DEFINE_integer("num_workers", None, "CRF processes; overrides --config.num_workers.")
    config_flags.DEFINE_config_dict("config", default_config(), lock_config=True)
    config_flags.DEFINE_config_file("run_config", None, "A run's config file: images from its "
                                    "dataset's train split instead of --image_dir.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "With --run_config: the run's workdir.")


def _check_sources(f) -> None:
    """One source of images: folders, or a run's config and workdir."""
    from absl import app

    if f.run_config is not None:
        if f.workdir is None or f.image_dir is not None:
            raise app.UsageError("--run_config needs --workdir and takes no --image_dir")
    elif f.cam_dir is None or f.image_dir is None or f.out_dir is None:
        raise app.UsageError("give --cam_dir, --image_dir and --out_dir, or --run_config and "
                             "--workdir")


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    _check_sources(f)
    cfg = f.config
    if f.method is not None:
        cfg.method = f.method
    try:
        registry.import_plugins(f.plugins)
        if f.run_config is None:
            out_dir, records = f.out_dir, list_records(f.cam_dir, f.image_dir)
        else:
            from pmm_jax.files.workdir import Workdir

            wd = Workdir(f.workdir)
            cfg.num_classes = f.run_config.data.num_classes
            out_dir = f.out_dir or (wd.rough_masks("train") if cfg.method == "rough"
                                    else wd.pseudo_masks(cfg.method, "train"))
            records = run_records(f.run_config, wd, f.cam_dir)
        stats = generate(records, out_dir, cfg, num_workers=f.num_workers, process_index=0,
                         process_count=1)
    except PseudoMaskError as err:
        sys.exit(f"error: {err}\n" + _format_stats(err.stats))
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(_format_stats(stats) + f" out_dir={out_dir}")


def _format_stats(stats: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in stats.items())


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
