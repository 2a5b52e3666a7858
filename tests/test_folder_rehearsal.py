"""Your own images, end to end: a folder of tagged images through every stage of
``configs/folder.py:tiny``, then ``pmm_jax.predict`` on images of other sizes and
``pmm_jax.export``, whose ``load`` must give predict's ``--nocrf`` masks.

The folder (built by :func:`make_folder`) mixes the synthetic shapes at three sizes and in
JPEG, RGB/greyscale/palette/RGBA PNG with the real VOC photographs when
``../shared/data/voc_samples`` is there (tagged with their VOC classes, shrunk by
``max_side``); ``train.txt`` alone picks the train images, some of which have masks (the
pseudo-masks are scored on them), the rest with masks are val. One run (module fixture)
serves every test.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pmm_jax.constants import SYNTHETIC_CLASSES, VOC_CLASSES
from pmm_jax.data.synthetic import render_sample
from pmm_jax.files import safe_io
from tests.support.paths import VOC_SAMPLES

pytestmark = pytest.mark.xdist_group("folder_rehearsal")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0"  # as tests/test_rehearsal.py
SIZES = (40, 48, 56)
MODES = ("jpg", "RGB", "L", "P", "RGBA")


def save_image(path_stem: pathlib.Path, image: np.ndarray, mode: str) -> None:
    """``image`` saved as a JPEG (``mode="jpg"``) or a PNG in PIL ``mode``."""
    if mode == "jpg":
        Image.fromarray(image).save(path_stem.with_suffix(".jpg"), quality=95)
    elif mode == "P":
        Image.fromarray(image).quantize(64).save(path_stem.with_suffix(".png"))
    else:
        Image.fromarray(image).convert(mode).save(path_stem.with_suffix(".png"))


def make_folder(root: pathlib.Path, num_train=28, num_train_masked=4, num_val=6) -> list[str]:
    """Writes the folder; returns its class names in folder order (sorted, no classes.txt)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(num_train + num_val):
        image, mask = render_sample(rng, SIZES[i % len(SIZES)])
        samples.append((f"s{i:03d}", image, mask))
    photos = sorted(VOC_SAMPLES.glob("*_label.png")) if VOC_SAMPLES.is_dir() else []
    names = sorted({SYNTHETIC_CLASSES[c] for _, _, m in samples for c in np.unique(m) if 0 < c < 255}
                   | {VOC_CLASSES[c] for p in photos for c in np.unique(np.asarray(Image.open(p)))
                      if 0 < c < 255})
    index = {name: i for i, name in enumerate(names, 1)}
    remap = np.full(256, 255, np.uint8)
    remap[0] = 0
    for k, name in enumerate(SYNTHETIC_CLASSES[1:], 1):
        remap[k] = index.get(name, 255)
    rows, train = [], []
    for i, (image_id, image, mask) in enumerate(samples):
        save_image(root / "images" / image_id, image, MODES[i % len(MODES)])
        tags = [SYNTHETIC_CLASSES[c] for c in np.unique(mask) if 0 < c < 255]
        rows.append(f"{image_id},{';'.join(tags)}")
        if i < num_train:
            train.append(image_id)
        if i >= num_train - num_train_masked:
            Image.fromarray(remap[mask]).save(root / "masks" / f"{image_id}.png")
    for label in photos:
        image_id = label.name[:-len("_label.png")]
        (root / "images" / f"{image_id}.png").write_bytes((label.parent / f"{image_id}.png").read_bytes())
        tags = [VOC_CLASSES[c] for c in np.unique(np.asarray(Image.open(label))) if 0 < c < 255]
        rows.append(f'{image_id},"{";".join(tags)}"')
        train.append(image_id)
    (root / "labels.csv").write_text("id,labels\n" + "\n".join(rows) + "\n")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    return names


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root; a failure shows its output."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The folder, the finished run, predictions (CRF with overlays, and --nocrf) of new
    images of other sizes, and an export; returns a dict of their paths."""
    base = tmp_path_factory.mktemp("folder_rehearsal")
    data, workdir = base / "leaves", base / "run"
    names = make_folder(data)
    main = run("pmm_jax.main", "--config=configs/folder.py:tiny", f"--config.data.folder={data}",
               f"--workdir={workdir}")
    new = base / "new"
    new.mkdir()
    rng = np.random.default_rng(5)
    for image_id, size in (("wide", 30), ("big", 150)):
        image, _ = render_sample(rng, size)
        Image.fromarray(image[: size // 2 + 3] if image_id == "wide" else image).save(new / f"{image_id}.png")
    Image.fromarray(render_sample(rng, 36)[0]).convert("L").save(new / "grey.jpg")
    crf = run("pmm_jax.predict", f"--workdir={workdir}", f"--images={new}",
              f"--out_dir={base / 'masks'}", "--overlay")
    again = run("pmm_jax.predict", f"--workdir={workdir}", f"--images={new}",
                f"--out_dir={base / 'masks'}", "--overlay")
    nocrf = run("pmm_jax.predict", f"--workdir={workdir}", f"--images={new}",
                f"--out_dir={base / 'masks_nocrf'}", "--nocrf")
    export = run("pmm_jax.export", f"--workdir={workdir}", f"--out={base / 'model'}")
    return dict(base=base, data=data, workdir=workdir, new=new, names=names,
                logs=dict(main=main, crf=crf, again=again, nocrf=nocrf, export=export))


def test_every_stage_ran_and_scores_are_reported(folder_run):
    workdir = folder_run["workdir"]
    for stage in ("cls", "cam", "pseudo", "seg", "cycle", "eval"):
        assert (workdir / "stages" / f"{stage}.json").exists(), stage
    results = safe_io.read_json(workdir / "results.json")
    assert all(isinstance(v, float) for v in results["pseudo_mask_miou"].values()), results
    assert results["pseudo_mask_eval"] == {"split": "train_masked", "num_images": 4}
    assert set(results["seg_miou"]) == {"pus", "cycle1", "cyclic"}
    assert all(isinstance(v, float) for v in results["seg_miou"].values())
    facts = safe_io.read_json(workdir / "dataset.json")
    assert facts["class_names"] == ["background", *folder_run["names"]]


def test_predict_writes_masks_at_each_images_size_with_overlays(folder_run):
    base, new = folder_run["base"], folder_run["new"]
    num_classes = len(folder_run["names"]) + 1
    for path in sorted(new.iterdir()):
        with Image.open(path) as image:
            size = (image.height, image.width)
        for masks in ("masks", "masks_nocrf"):
            mask = safe_io.read_mask(str(base / masks / f"{path.stem}.png"))
            assert mask.shape == size and mask.max() < num_classes, (masks, path.name)
        with Image.open(base / "masks" / f"{path.stem}_overlay.jpg") as overlay:
            assert overlay.width >= size[1] and overlay.height > size[0]
    assert "wrote 3 mask(s)" in folder_run["logs"]["crf"].stdout
    assert "wrote 0 mask(s)" in folder_run["logs"]["again"].stdout
    assert "skipped 3 already done" in folder_run["logs"]["again"].stdout


def test_export_loads_with_jax_alone_and_equals_predict_without_crf(folder_run):
    base, new = folder_run["base"], folder_run["new"]
    script = f"""
import sys
for name in ("flax", "tensorflow", "tensorflow_datasets", "ml_collections", "optax", "orbax"):
    sys.modules[name] = None
import json, pathlib
import numpy as np
from PIL import Image
from pmm_jax.export import load
segment = load({str(base / 'model')!r})
out = {{}}
for path in sorted(pathlib.Path({str(new)!r}).iterdir()):
    out[path.stem] = segment(np.asarray(Image.open(path).convert("RGB"))).tolist()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(exported) == {"wide", "big", "grey"}
    for image_id, labels in exported.items():
        expected = safe_io.read_mask(str(base / "masks_nocrf" / f"{image_id}.png"))
        np.testing.assert_array_equal(np.asarray(labels, np.uint8), expected, err_msg=image_id)
    meta = json.loads((base / "model" / "meta.json").read_text())
    assert meta["class_names"] == ["background", *folder_run["names"]]
    assert meta["run"] in folder_run["logs"]["nocrf"].stdout
