r"""Peak host memory of CAM inference per image: ``configs/voc.py``'s SEAM ResNet38-d on
VOC-sized images (500x375 padded to 512x512, as the cam stage's eval batches), one cam-stage
batch in a fresh process.

    python bench/cam_memory.py --method=multiscale --batch_size=1 --width_div=1
    python bench/cam_memory.py --method=multicrop --batch_size=1 --width_div=16

Prints one Markdown row: method, batch, width, the process's resident memory after building
the model (baseline) and its peak over the first call (compile + run) and a second call (run
only), and (peak - baseline) / batch. Run on the device it reports (``jax.devices()[0]``);
on a GPU the host figure excludes device memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_report import in_child, max_rss_bytes  # noqa: E402

GIB = 1024 ** 3


def rss_bytes() -> int:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace) -> dict:
    """Builds the classifier and the cam stage's predictor, runs one batch twice."""
    import importlib.util

    import jax
    import numpy as np

    from pmm_jax.cams import classifier, methods

    spec = importlib.util.spec_from_file_location("voc_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.cls.model.backbone = dict(name="resnet38", width_div=args.width_div)
    config.cam.method = args.method
    config.cam.batch_size = args.batch_size
    if args.scales:
        config.cam.scales = tuple(float(s) for s in args.scales.split(","))
        config.cam.multicrop.scales = config.cam.scales
    model = classifier.build_model(config)
    predict = methods.make_predictor(config, model, classifier.method(config).cam)
    b, (h, w) = args.batch_size, (512, 512)
    rng = np.random.default_rng(0)
    raw = np.zeros((b, h, w, 3), np.uint8)
    raw[:, :375, :500] = rng.integers(0, 256, (b, 375, 500, 3), dtype=np.uint8)
    from pmm_jax.constants import IMAGENET_MEAN_UNIT, IMAGENET_STD_UNIT
    image = ((raw / 255.0 - IMAGENET_MEAN_UNIT) / IMAGENET_STD_UNIT).astype(np.float32)
    image[:, 375:] = 0
    image[:, :, 500:] = 0
    labels = np.zeros((b, 20), np.float32)
    labels[:, [2, 14]] = 1
    batch = {"image": image, "raw": raw, "labels": labels, "valid": np.ones(b, bool),
             "height": np.full(b, 375, np.int32), "width": np.full(b, 500, np.int32),
             "id": np.array([b"x"] * b)}
    baseline = rss_bytes()
    seconds = []
    for _ in range(2):
        start = time.time()
        out = np.asarray(predict(batch, list(range(b))))
        seconds.append(time.time() - start)
    return {"method": args.method, "batch": b, "width_div": args.width_div,
            "baseline_gib": baseline / GIB, "peak_gib": max_rss_bytes() / GIB,
            "per_image_gib": (max_rss_bytes() - baseline) / GIB / b,
            "seconds": seconds, "checksum": float(np.abs(out).sum()),
            "device": str(jax.devices()[0].platform), "dtype": str(out.dtype)}


def main() -> None:
    from pmm_jax.cams.methods import CAM_METHODS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "configs", "voc.py"))
    parser.add_argument("--method", choices=CAM_METHODS.names(), default="multiscale")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--width_div", type=int, default=1)
    parser.add_argument("--scales", default="", help="comma-separated; default: the config's")
    args = parser.parse_args()
    row = in_child(measure, args)
    print(f"| {row['method']} | {row['batch']} | 1/{row['width_div']} | {row['baseline_gib']:.2f} "
          f"| {row['peak_gib']:.2f} | {row['per_image_gib']:.2f} | "
          f"{row['seconds'][0]:.1f} / {row['seconds'][1]:.1f} | {row['device']} |  load "
          f"{os.getloadavg()[0]:.1f} checksum {row['checksum']:.6g} {row['dtype']}")


if __name__ == "__main__":
    main()
