"""Segmenting new images with a finished run's segmenter (the library of ``pmm_jax.predict``).

The run's own config (``WORKDIR/config.json``) gives the model and the test-time pipeline
(``config.eval``: sliding window, scales, flip, CRF; ``segmentation/inference.py``); its
dataset (``WORKDIR/dataset.json``, written when the run opened it) the class names and the
canvas every image goes on (``segmentation/canvas.py``). Which segmenter: ``--run``, else the
best by val mIoU in ``results.json``, else (no val) the PUS run (:func:`choose_run`).

Every mask and overlay carries its :func:`output_record` (PNG text chunk / JPEG comment
``RECORD_KEY``): the tool and its version, the run, its checkpoint (folder, step and a
fingerprint of its weights), the test-time settings and the source image's sha256. A file
there is done only when it decodes whole and its record equals this call's; a file without a
record was not written here and is never overwritten; one with another record (another
segmenter, retrained weights, other settings, a changed image) is redone only with
``overwrite``. Nothing is written into the folder that holds the images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pmm_jax import drawing
from pmm_jax.constants import PALETTE
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.segmentation import canvas

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RECORD_KEY = "pmm_jax.predict"  # PNG text key; JPEG comments hold the record alone


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
    record = run_file(wd.dataset_json, "a record of the run's dataset", fix=(
        "rerun `python -m pmm_jax.main` with the run's config on this workdir (its completed "
        "stages are skipped) to write it again"))
    try:
        return DatasetFacts(name=record["name"], class_names=tuple(record["class_names"]),
                            canvas=tuple(int(v) for v in record["canvas"]))
    except (KeyError, TypeError, ValueError) as err:
        raise PredictError(f"{wd.dataset_json} lacks or garbles {err}; rerun `python -m "
                           "pmm_jax.main` with the run's config on this workdir (its completed "
                           "stages are skipped) to write it again") from None


def run_file(path: str, what: str, fix: str):
    """The JSON object in ``path`` (a file of the workdir), or PredictError naming it when it
    is empty, cut or not an object (``what`` it is, ``fix`` what to do)."""
    try:
        record = safe_io.read_json(path)
    except (OSError, ValueError) as err:
        raise PredictError(f"{path} ({what}) cannot be read ({type(err).__name__}: {err}); it "
                           f"is empty, cut or damaged: {fix}") from None
    if not isinstance(record, dict):
        raise PredictError(f"{path} ({what}) holds {type(record).__name__}, not a JSON object; "
                           f"{fix}")
    return record


def run_config(workdir: str):
    """The run's config (``config.json``); PredictError when ``workdir`` holds no run."""
    import ml_collections

    wd = Workdir(workdir)
    if not os.path.exists(wd.config_json):
        raise PredictError(f"--workdir={workdir} holds no run (no {wd.config_json}); train one "
                           "first with `python -m pmm_jax.main --config=... --workdir=...`")
    return ml_collections.ConfigDict(run_file(wd.config_json, "the run's config", fix=(
        "write it again from the config file the run was trained with: `python -m "
        "pmm_jax.main --config=... --workdir=...` writes it when it is absent (move this one "
        "away first; completed stages are skipped)")))


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
        scores = run_file(wd.results_json, "the run's scores", fix=(
            "name the segmenter with --run, or redo the eval stage: `python -m pmm_jax.main "
            "--config=... --workdir=... --redo=eval`")).get("seg_miou", {})
        mious = {r: v for r, v in (scores.items() if isinstance(scores, dict) else ())
                 if r in finished and isinstance(v, (int, float))}
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
            if not p.is_file():
                kind = "a folder" if p.is_dir() else "a link to nothing" if p.is_symlink() \
                    else "not a regular file"
                raise PredictError(f"{p} is {kind}, not an image, but is named like one; move "
                                   "it out of --images")
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
        from pmm_jax.segmentation import best_checkpoint

        facts = dataset_facts(wd)
        eval_cfg = dict(config.eval.to_dict())
        if crf is not None:
            eval_cfg["crf"] = crf
        self._setup(best_checkpoint.load_segmenter(config, wd, run, facts.num_classes), facts,
                    eval_cfg, dense_crf.config_backend(config), f"segmenter '{run}' of {wd.root}")

    @classmethod
    def of_model(cls, model, facts: DatasetFacts, eval_cfg, crf_backend: str | None = None,
                 source: str = "the segmenter") -> "ImageSegmenter":
        """The same for a model in hand (``eval_cfg`` as ``config.eval``), e.g. a benchmark's."""
        from pmm_jax.masks import dense_crf

        self = cls.__new__(cls)
        self._setup(model, facts, eval_cfg, crf_backend or dense_crf.DEFAULT_BACKEND, source)
        return self

    def _setup(self, model, facts: DatasetFacts, eval_cfg, crf_backend: str, source: str):
        from pmm_jax.segmentation import inference

        self.facts = facts
        self._rows = jax.local_device_count()
        self._predict = inference.Predictor(model, eval_cfg, crf_backend=crf_backend,
                                            source=source)

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


def write_jpeg(path: str, picture: np.ndarray, comment: str = "") -> None:
    """Atomically writes an RGB picture as JPEG (quality 90), ``comment`` in its COM segment."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="JPEG", quality=90, comment=comment.encode())
    safe_io.write_bytes(path, buffer.getvalue())


def checkpoint_fingerprint(directory: str, step: int) -> str:
    """A short sha256 naming the weights of checkpoint ``step`` in ``directory``: of its
    digest (which lists every file's sha256), else of its files' names, sizes and times."""
    from pmm_jax.training import checkpoints

    step_dir = os.path.join(directory, str(step))
    digest = os.path.join(step_dir, checkpoints.DIGEST_FILE)
    sha = hashlib.sha256()
    if os.path.isfile(digest):
        with open(digest, "rb") as f:
            sha.update(f.read())
    else:
        for root, _, names in sorted(os.walk(step_dir)):
            for name in sorted(names):
                stat = os.stat(os.path.join(root, name))
                sha.update(f"{os.path.relpath(root, step_dir)}/{name} {stat.st_size} "
                           f"{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()[:16]


def output_record(config, wd: Workdir, run: str, crf: bool | None) -> dict:
    """What made this call's outputs (every output carries it, plus its image's sha256):
    the tool and version, run, checkpoint folder, step and weights, test-time settings."""
    import pmm_jax
    from pmm_jax.segmentation import best_checkpoint

    directory, step = best_checkpoint.segmenter_checkpoint(config, wd, run)
    settings = dict(config.eval.to_dict())
    if crf is not None:
        settings["crf"] = crf
    if settings.get("crf"):
        settings["crf_backend"] = config.get("crf", {}).get("backend", None)
    return {"tool": RECORD_KEY, "version": pmm_jax.__version__, "run": run,
            "checkpoint": os.path.abspath(directory), "step": int(step),
            "weights": checkpoint_fingerprint(directory, step),
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))}


def read_output_record(path: str) -> dict | None:
    """The record an output carries; None when the file does not exist. PredictError-free:
    ``{}`` for a file without a record (not written here), ``{"damaged": ...}`` for one with a
    record that does not decode whole (a write cut short by something else than this tool)."""
    if not os.path.lexists(path):
        return None
    try:
        with Image.open(path) as image:
            text = image.info.get(RECORD_KEY) if image.format == "PNG" else image.info.get("comment")
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            try:
                record = json.loads(text) if text else {}
            except ValueError:
                record = {}
            if not isinstance(record, dict) or record.get("tool") != RECORD_KEY:
                return {}
            try:
                image.verify()  # every chunk's checksum, up to the PNG's end
                with Image.open(path) as again:
                    again.load()
            except (OSError, ValueError, SyntaxError) as err:
                return {"damaged": str(err) or type(err).__name__}
            return record
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return {}


def _difference(found: dict, expected: dict) -> str:
    """What differs between an output's record and this call's, in words."""
    if "damaged" in found:
        return f"it does not decode ({found['damaged']})"
    keys = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if "image" in keys:
        return "its image changed since"
    return "; ".join(f"{k} {found.get(k)!r}, now {expected.get(k)!r}" for k in keys
                     if k != "settings") or "test-time settings differ (e.g. --crf/--nocrf)"


def plan_outputs(paths: dict[str, pathlib.Path], out_dir: str, overlay: bool, record: dict,
                 overwrite: bool) -> tuple[list[str], dict[str, str]]:
    """``(todo ids, {id: record text})``: the ids whose outputs are not all done, each with
    the record its outputs get. PredictError, before anything is written, for an output that
    this tool did not write (never overwritten) or, unless ``overwrite``, one written with
    another record (named, with the flag that redoes it)."""
    todo, records, foreign, stale = [], {}, [], []
    for image_id, source in paths.items():
        try:
            safe_io.check_image(str(source))  # every image, before any is predicted
        except ValueError as err:
            raise PredictError(f"{err}; or move it out of --images") from None
        text = json.dumps({**record, "image": {"file": source.name,
                                               "sha256": safe_io.file_sha256(str(source))}},
                          sort_keys=True)
        names = [f"{image_id}.png"] + ([f"{image_id}_overlay.jpg"] if overlay else [])
        done = True
        for name in names:
            target = os.path.join(out_dir, name)
            found = read_output_record(target)
            if found is None:
                done = False
            elif not found:
                foreign.append(target)
            elif found != json.loads(text):
                done = False
                if "damaged" not in found:
                    stale.append((target, _difference(found, json.loads(text))))
        if not done:
            todo.append(image_id)
            records[image_id] = text
    if foreign:
        raise PredictError(
            f"{foreign[0]}" + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else "")
            + " is in the way of an output and was not written by pmm_jax.predict (it carries "
            "no record of it); predict never overwrites such a file: choose an empty --out_dir, "
            "or move the file away")
    if stale and not overwrite:
        raise PredictError(
            f"{stale[0][0]}" + (f" (and {len(stale) - 1} more)" if len(stale) > 1 else "")
            + f" was predicted differently ({stale[0][1]}); rerun with --overwrite to redo "
            "such outputs, or choose another --out_dir")
    return todo, records


def check_out_dir(paths: dict[str, pathlib.Path], out_dir: str) -> None:
    """PredictError when ``out_dir`` is a file, or the folder that holds any of the images
    (their masks would sit among them, or replace them)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PredictError(f"--out_dir={out_dir} is a file, not a folder; name a folder (it is "
                           "created when absent)")
    if not os.path.isdir(out_dir):
        return
    for source in paths.values():
        if os.path.samefile(source.parent, out_dir):
            raise PredictError(f"--out_dir={out_dir} is the folder of the images ({source}); "
                               "predict never writes among its input: choose another --out_dir")


def predict_images(workdir: str, images: str, out_dir: str, *, run: str | None = None,
                   overlay: bool = False, crf: bool | None = None, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Writes ``out_dir/<id>.png`` (palette mask at the image's size; with ``overlay`` also
    ``<id>_overlay.jpg``) for every image of ``images`` not done yet (see the module's
    docstring; ``overwrite`` redoes outputs made differently); returns
    ``{"run", "written", "skipped"}``."""
    import tqdm

    workdir, out_dir = os.path.expanduser(workdir), os.path.expanduser(out_dir)
    wd = Workdir(workdir)
    config = run_config(workdir)
    name = choose_run(config, wd, run)
    dataset_facts(wd)  # refuses a workdir without dataset.json before any work
    paths = image_paths(images)
    check_out_dir(paths, out_dir)
    todo, records = plan_outputs(paths, out_dir, overlay, output_record(config, wd, name, crf),
                                 overwrite)
    os.makedirs(out_dir, exist_ok=True)
    safe_io.remove_stale_temps(out_dir)
    result = {"run": name, "written": 0, "skipped": len(paths) - len(todo)}
    if not todo:
        return result
    segment = ImageSegmenter(config, wd, name, crf=crf)
    chunk = jax.local_device_count()  # one Predictor call: a row per device
    bar = tqdm.tqdm(total=len(todo), desc=f"predict {name}", unit="image", disable=not progress)
    for start in range(0, len(todo), chunk):
        ids = todo[start:start + chunk]
        try:
            pictures = [safe_io.read_image(str(paths[i])) for i in ids]
        except ValueError as err:
            raise PredictError(str(err)) from None
        for image_id, image, mask in zip(ids, pictures, segment(pictures)):
            safe_io.write_mask(os.path.join(out_dir, f"{image_id}.png"), mask,
                          text={RECORD_KEY: records[image_id]})
            if overlay:
                write_jpeg(os.path.join(out_dir, f"{image_id}_overlay.jpg"),
                           overlay_picture(image, mask, segment.facts.class_names),
                           comment=records[image_id])
            result["written"] += 1
        bar.update(len(ids))
    bar.close()
    return result
