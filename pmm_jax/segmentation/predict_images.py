"""Segmenting new images with a finished run's segmenter (the library of ``pmm_jax.predict``).

The run's own config (``WORKDIR/config.json``) gives the model and the test-time pipeline
(``config.eval``: sliding window, scales, flip, CRF; ``segmentation/inference.py``); its
dataset (``WORKDIR/dataset.json``, written when the run opened it) the class names and the
canvas every image goes on (``segmentation/canvas.py``). Which segmenter: ``--run``, else the
best by val mIoU in ``results.json``, else (no val) the PUS run (:func:`choose_run`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pmm_jax import drawing
from pmm_jax.constants import PALETTE
from pmm_jax.files import io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import canvas

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PredictError(RuntimeError):
    """The workdir, run or images do not allow predicting; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What a trained segmenter needs of its dataset: class names (index 0 background) and
    the canvas ``(H, W)`` its images are predicted on."""

    name: str
    class_names: tuple[str, ...]
    canvas: tuple[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def dataset_facts(wd: Workdir) -> DatasetFacts:
    """The facts the run recorded in ``WORKDIR/dataset.json``; PredictError without it."""
    if not os.path.exists(wd.dataset_json):
        raise PredictError(f"{wd.root} has no {wd.dataset_json}: the run predates it; rerun "
                           "`python -m pmm_jax.main` with its config on this workdir (its "
                           "completed stages are skipped) to record it")
    record = io.read_json(wd.dataset_json)
    return DatasetFacts(name=record["name"], class_names=tuple(record["class_names"]),
                        canvas=tuple(int(v) for v in record["canvas"]))


def run_config(workdir: str):
    """The run's config (``config.json``); PredictError when ``workdir`` holds no run."""
    import ml_collections

    wd = Workdir(workdir)
    if not os.path.exists(wd.config_json):
        raise PredictError(f"--workdir={workdir} holds no run (no {wd.config_json}); train one "
                           "first with `python -m pmm_jax.main --config=... --workdir=...`")
    return ml_collections.ConfigDict(io.read_json(wd.config_json))


def finished_runs(config, wd: Workdir) -> list[str]:
    """Segmenter runs whose training stage (seg, or cycle for cyclic runs) has completed."""
    from pmm_jax.segmentation import runs

    return [r for r, stage in runs.all_runs(config)
            if os.path.exists(wd.stage_marker(stage)) and os.path.isdir(wd.ckpt_dir(f"seg/{r}"))]


def choose_run(config, wd: Workdir, run: str | None = None) -> str:
    """``run`` when given and finished; else the finished run with the best val mIoU of
    ``results.json``; else (no val, or no eval stage yet) ``pus`` when finished, else the
    first finished. PredictError (one paragraph) when none is finished."""
    finished = finished_runs(config, wd)
    if not finished:
        raise PredictError(
            f"{wd.root} has no finished segmenter (stage 'seg' has not completed: no "
            f"{wd.stage_marker('seg')}); run the pipeline through stage seg first, e.g. "
            "`python -m pmm_jax.main --config=... --workdir=...`")
    if run is not None:
        if run not in finished:
            raise PredictError(f"--run={run}: no finished segmenter of that name in {wd.root}; "
                               f"finished: {', '.join(finished)}")
        return run
    mious = {}
    if os.path.exists(wd.results_json):
        mious = {r: v for r, v in io.read_json(wd.results_json).get("seg_miou", {}).items()
                 if r in finished and v is not None}
    if mious:
        return max(mious, key=mious.get)
    return "pus" if "pus" in finished else finished[0]


def image_paths(path: str) -> dict[str, pathlib.Path]:
    """``{id: file}`` of ``path``: one image file, or the images directly in a folder."""
    root = pathlib.Path(path).expanduser()
    if root.is_file():
        return {root.stem: root}
    if not root.is_dir():
        raise PredictError(f"--images={path} is neither an image file nor a folder")
    found: dict[str, pathlib.Path] = {}
    for p in sorted(root.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in found:  # both would write <id>.png
                raise PredictError(f"{found[p.stem]} and {p} have the same id {p.stem!r}; "
                                   "rename one")
            found[p.stem] = p
    if not found:
        raise PredictError(f"--images={path} holds no .jpg, .jpeg or .png image")
    return found


class ImageSegmenter:
    """``segment([uint8 [H, W, 3], ...]) -> [uint8 [H, W], ...]``: a run's segmenter with its
    test-time pipeline (``crf`` None = the config's), images of any size on the canvas."""

    def __init__(self, config, wd: Workdir, run: str, crf: bool | None = None):
        from pmm_jax.masks import dense_crf
        from pmm_jax.segmentation import inference
        from pmm_jax.segmentation import best_checkpoint

        self.facts = dataset_facts(wd)
        self.run = run
        model = best_checkpoint.load_segmenter(config, wd, run, self.facts.num_classes)
        eval_cfg = dict(config.eval.to_dict())
        if crf is not None:
            eval_cfg["crf"] = crf
        self._rows = jax.local_device_count()
        self._predict = inference.Predictor(
            model, eval_cfg, crf_backend=dense_crf.config_backend(config),
            source=f"segmenter '{run}' of {wd.root}")

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        for start in range(0, len(images), self._rows):
            out += self._batch(images[start:start + self._rows])
        return out

    def _batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One call of the Predictor on up to ``local_device_count`` images (padded rows)."""
        height, width = self.facts.canvas
        batch = {"image": np.zeros((self._rows, height, width, 3), np.float32),
                 "raw": np.zeros((self._rows, height, width, 3), np.uint8),
                 "valid": np.zeros(self._rows, bool), "height": np.zeros(self._rows, np.int32),
                 "width": np.zeros(self._rows, np.int32),
                 "id": np.array([b""] * self._rows, dtype=object)}
        inners = []
        for i, image in enumerate(images):
            batch["image"][i], batch["raw"][i], inner = canvas.fit(image, self.facts.canvas)
            batch["valid"][i], (batch["height"][i], batch["width"][i]) = True, inner
            batch["id"][i] = str(i).encode()
            inners.append(inner)
        labels = self._predict(batch)
        return [canvas.restore(labels[i], inners[i], image.shape[:2])
                for i, image in enumerate(images)]


def overlay_picture(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """The image with the mask's colours blended in and, below it, a legend of the classes
    present (a colour box and the name of each)."""
    blended = drawing.overlay(image, drawing.colorize_mask(mask), 0.5)
    present = [int(c) for c in np.unique(mask) if int(c) < len(class_names)]
    font = ImageFont.load_default()
    row = 14
    legend = Image.new("RGB", (max(image.shape[1], 160), row * len(present) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for k, c in enumerate(present):
        y = 2 + k * row
        draw.rectangle([2, y, 12, y + 10], fill=tuple(int(v) for v in PALETTE[c]), outline=(0, 0, 0))
        draw.text((16, y - 1), f"{c} {class_names[c]}", fill=(0, 0, 0), font=font)
    picture = np.full((image.shape[0] + legend.height, legend.width, 3), 255, np.uint8)
    picture[:image.shape[0], :image.shape[1]] = blended
    picture[image.shape[0]:] = np.asarray(legend)
    return picture


def write_jpeg(path: str, picture: np.ndarray) -> None:
    """Atomically writes an RGB picture as JPEG (quality 90)."""
    import io as _io

    buffer = _io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
    io.write_bytes(path, buffer.getvalue())


def pending(paths: dict[str, pathlib.Path], out_dir: str, overlay: bool) -> Iterator[str]:
    """The ids whose outputs are not all in ``out_dir`` yet."""
    for image_id in paths:
        done = os.path.exists(os.path.join(out_dir, f"{image_id}.png"))
        if overlay:
            done = done and os.path.exists(os.path.join(out_dir, f"{image_id}_overlay.jpg"))
        if not done:
            yield image_id


def predict_images(workdir: str, images: str, out_dir: str, *, run: str | None = None,
                   overlay: bool = False, crf: bool | None = None, progress: bool = True) -> dict:
    """Writes ``out_dir/<id>.png`` (palette mask at the image's size; with ``overlay`` also
    ``<id>_overlay.jpg``) for every image of ``images`` not done yet; returns
    ``{"run", "written", "skipped"}``."""
    import tqdm

    workdir, out_dir = os.path.expanduser(workdir), os.path.expanduser(out_dir)
    wd = Workdir(workdir)
    config = run_config(workdir)
    name = choose_run(config, wd, run)
    dataset_facts(wd)  # refuses a workdir without dataset.json before any work
    paths = image_paths(images)
    todo = list(pending(paths, out_dir, overlay))
    os.makedirs(out_dir, exist_ok=True)
    io.remove_stale_temps(out_dir)
    result = {"run": name, "written": 0, "skipped": len(paths) - len(todo)}
    if not todo:
        return result
    segment = ImageSegmenter(config, wd, name, crf=crf)
    chunk = jax.local_device_count()  # one Predictor call: a row per device
    bar = tqdm.tqdm(total=len(todo), desc=f"predict {name}", unit="image", disable=not progress)
    for start in range(0, len(todo), chunk):
        ids = todo[start:start + chunk]
        try:
            pictures = [io.read_image(str(paths[i])) for i in ids]
        except ValueError as err:
            raise PredictError(str(err)) from None
        for image_id, image, mask in zip(ids, pictures, segment(pictures)):
            io.write_mask(os.path.join(out_dir, f"{image_id}.png"), mask)
            if overlay:
                write_jpeg(os.path.join(out_dir, f"{image_id}_overlay.jpg"),
                           overlay_picture(image, mask, segment.facts.class_names))
            result["written"] += 1
        bar.update(len(ids))
    bar.close()
    return result
