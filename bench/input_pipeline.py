r"""Input-pipeline benchmark: images/s of JPEG decode + augment through ``train_batches``.

    python bench/input_pipeline.py [--num_images=256 --batch_size=16 --crop_size=448 --steps=40]

Writes a fake VOCdevkit of VOC-sized JPEGs (smooth colour fields with rectangles and mild
noise, so they compress and decode like photographs rather than like white noise) into a
temporary folder, prepares it with ``pmm_jax.data.prepare`` (the preparation rate is
reported too: it is what ``docs/datasets.md`` extrapolates preparation times from), then times
``pmm_jax.data.pipeline.train_batches`` on the ``train`` split after a warm-up, as the stages
read it (encoded, decoded after shuffling). It also times the first batch of a stream resumed
at ``--resume_step`` (default: three quarters into the second epoch), which skips the consumed
batches without decoding them (``pipeline.stream``), beside the first batch of a fresh
stream. Prints one JSON line with the rates, times and the number of CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pmm_jax.data import pipeline, prepare, voc  # noqa: E402
from pmm_jax.files import safe_io  # noqa: E402


def fake_photo(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photograph-like image (uint8 ``[H, W, 3]``) and a VOC-like mask with a void outline."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(1, 4)):
        h, w = rng.integers(height // 6, height // 2), rng.integers(width // 6, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        mask[y:y + h, x:x + w] = rng.integers(1, voc.NUM_CLASSES + 1)
        mask[y:y + h, [x, x + w - 1]] = mask[[y, y + h - 1], x:x + w] = 255
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_fake_voc(root: pathlib.Path, num_images: int, seed: int = 0) -> None:
    """``num_images`` train images (VOC sizes, 300..500 px a side), 8 val, no SBD extras."""
    rng = np.random.default_rng(seed)
    vocdir = root / "VOCdevkit" / "VOC2012"
    (vocdir / "JPEGImages").mkdir(parents=True)
    (vocdir / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()  # empty: train_aug == train
    ids = [f"2012_{i:06d}" for i in range(num_images + 8)]
    for image_id in ids:
        height, width = rng.choice([333, 375, 500]), rng.choice([375, 500])
        image, mask = fake_photo(rng, int(height), int(width))
        Image.fromarray(image).save(vocdir / "JPEGImages" / f"{image_id}.jpg", quality=90)
        safe_io.write_mask(str(vocdir / "SegmentationClass" / f"{image_id}.png"), mask)
    lists = vocdir / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(ids[:num_images]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[num_images:]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--crop_size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=40, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--resume_step", type=int, default=None,
                        help="step a timed resumed stream starts at (default 1.75 epochs)")
    args = parser.parse_args()
    resume_step = (args.resume_step if args.resume_step is not None
                   else int(1.75 * args.num_images) // args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_fake_voc(root / "manual", args.num_images)
        start = time.perf_counter()
        builder = prepare.prepare("voc", str(root / "manual"), str(root / "tfds"))
        prepared = sum(split.num_examples for split in builder.info.splits.values())
        prepare_rate = prepared / (time.perf_counter() - start)

        ds = pipeline.load_split("voc2012_wsss", "train", str(root / "tfds"),
                                 process_index=0, process_count=1, decode=False)

        def stream(start_step: int):
            return pipeline.train_batches(ds, batch_size=args.batch_size,
                                          crop_size=args.crop_size, seed=0,
                                          num_foreground=voc.NUM_CLASSES, start_step=start_step)

        def first_batch_seconds(start_step: int) -> float:
            start = time.perf_counter()
            next(stream(start_step))
            return time.perf_counter() - start

        batches = stream(0)
        for _ in range(args.warmup):
            next(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        train_rate = args.steps * args.batch_size / (time.perf_counter() - start)
        fresh_first, resumed_first = first_batch_seconds(0), first_batch_seconds(resume_step)

    print(json.dumps({
        "train_batches_images_per_s": round(train_rate, 1),
        "prepare_examples_per_s": round(prepare_rate, 1),
        "fresh_first_batch_s": round(fresh_first, 2),
        f"resumed_at_step_{resume_step}_first_batch_s": round(resumed_first, 2),
        "skipped_images": resume_step * args.batch_size,
        "crop_size": args.crop_size, "batch_size": args.batch_size,
        "cpu_cores": len(os.sched_getaffinity(0)), "image_sizes": "333..500 x 375..500 JPEG",
    }))


if __name__ == "__main__":
    main()
