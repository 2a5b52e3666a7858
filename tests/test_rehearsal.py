"""The paper configs end to end at rehearsal size, run by the documented commands.

docs/rehearsal.md's command lines run exactly as written (``bash``, in a temporary home folder
holding links to ``configs/`` and ``tests/``, so ``~/tfds`` and the relative workdirs resolve
there): a VOC-shaped tree (VOCdevkit + SBD, JPEGs at real VOC sizes, palette masks with 255
borders, 21 classes, the real photographs when present) -> ``prepare`` -> every stage of
``configs/voc.py:rehearsal`` -> rough masks from its CAMs (docs/multicrop.md), and a
COCO-shaped tree -> ``prepare`` -> every stage of ``configs/coco.py:rehearsal``. The outputs
are checked against the trees' own image sizes. The commands of docs/multicrop.md and
docs/datasets.md must parse on the locked config and name the dataset folder as the rehearsed
ones do.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from pmm_jax.files import safe_io

# pycocotools 2.0.x under numpy 2 warns about its own __array__ call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PSEUDO_VARIANTS = ("baseline", "crf_cvs", "ppmg_no_cvs", "ppmg")
# The rehearsals check commands, files and shapes, not figures, and their time is mostly XLA
# compiling big programs once: LLVM's optimisations off makes those compiles faster.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def documented_commands(doc: pathlib.Path) -> list[list[str]]:
    """The command lines of the ```bash blocks of ``doc`` (continuations joined, comments
    dropped), one list of lines per block."""
    blocks = re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
        commands.append([line for line in lines if line and not line.startswith("#")])
    return commands


def run_in_home(home: pathlib.Path, command: str, timeout: int = 1800) -> str:
    """Runs ``command`` with bash in ``home`` (also $HOME) with this interpreter first on the
    PATH and the repo importable; returns its stderr. A failure shows the output."""
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(ROOT),
               PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}")
    proc = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\nfailed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stderr


def rehearsal_home(tmp_path_factory, name: str) -> pathlib.Path:
    home = tmp_path_factory.mktemp(name)
    for folder in ("configs", "tests"):
        (home / folder).symlink_to(ROOT / folder)
    return home


@pytest.fixture(scope="module")
def voc_home(tmp_path_factory):
    """docs/rehearsal.md's VOC commands, run as written; returns the home folder and their
    stderr."""
    home = rehearsal_home(tmp_path_factory, "voc_home")
    commands = documented_commands(DOCS / "rehearsal.md")[0]
    log = "".join(run_in_home(home, command) for command in commands)
    return home, log


@pytest.fixture(scope="module")
def coco_home(tmp_path_factory):
    """docs/rehearsal.md's COCO commands, run as written; returns the home folder and their
    stderr."""
    home = rehearsal_home(tmp_path_factory, "coco_home")
    commands = documented_commands(DOCS / "rehearsal.md")[1]
    log = "".join(run_in_home(home, command) for command in commands)
    return home, log


def image_sizes(jpeg_dir: pathlib.Path) -> dict[str, tuple[int, int]]:
    """``{id: (H, W)}`` of the JPEGs in ``jpeg_dir``."""
    from PIL import Image
    sizes = {}
    for path in jpeg_dir.glob("*.jpg"):
        with Image.open(path) as image:
            sizes[path.stem] = (image.height, image.width)
    return sizes


def split_ids(data_dir: pathlib.Path, name: str, split: str) -> list[str]:
    """The ids of a prepared split, sorted."""
    import tensorflow_datasets as tfds

    from pmm_jax.data import coco, voc  # noqa: F401  (registers the builders)
    builder = tfds.builder(name, data_dir=str(data_dir))
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return sorted(ex["id"].decode() for ex in tfds.as_numpy(ds))


def check_cams(cam_dir: pathlib.Path, sizes: dict, ids: list[str]) -> None:
    """One official-format CAM file per image, every class map at the image's own size."""
    files = sorted(p.stem for p in cam_dir.glob("*.npy"))
    assert files == sorted(ids)
    for image_id in ids:
        cams = np.load(cam_dir / f"{image_id}.npy", allow_pickle=True).item()
        for cls, cam in cams.items():
            assert cam.shape == sizes[image_id], (image_id, cls, cam.shape)
            assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1.001


def check_masks(mask_dir: pathlib.Path, sizes: dict, ids: list[str], num_classes: int) -> None:
    """One PNG per image at its JPEG's size, values in 0..num_classes-1."""
    assert sorted(p.stem for p in mask_dir.glob("*.png")) == sorted(ids), mask_dir
    for image_id in ids:
        mask = safe_io.read_mask(str(mask_dir / f"{image_id}.png"))
        assert mask.shape == sizes[image_id], (mask_dir, image_id, mask.shape)
        assert mask.max() < num_classes, (mask_dir, image_id, mask.max())


def check_results(workdir: pathlib.Path, seg_runs: set[str], stages: set[str]) -> None:
    """results.json has the CAM, every pseudo-mask variant's and every segmenter's mIoU
    (``cyclic`` may repeat the last cycle) and every stage's time."""
    results = safe_io.read_json(str(workdir / "results.json"))
    assert 0 <= results["cam_miou"] <= 1 and results["cam_bg_threshold"] > 0
    assert set(results["pseudo_mask_miou"]) == set(PSEUDO_VARIANTS)
    assert set(results["seg_miou"]) - {"cyclic"} == seg_runs
    assert all(0 <= v <= 1 for v in [*results["pseudo_mask_miou"].values(),
                                      *results["seg_miou"].values()])
    assert set(results["seconds"]) == stages


def check_random_init_warnings(log: str) -> None:
    """Both training stages said that no ImageNet weights were loaded."""
    for model in ("cls", "seg"):
        assert f"{model}: no ImageNet weights loaded" in log, model


def test_voc_rehearsal_outputs(voc_home):
    """Every stage of configs/voc.py:rehearsal, outputs at each image's own size, and the
    rough masks of the multi-crop recipe from its CAMs."""
    voc_home, log = voc_home
    check_random_init_warnings(log)
    data = voc_home / "data" / "voc" / "VOCdevkit" / "VOC2012"
    sizes = image_sizes(data / "JPEGImages")
    assert {(500, 375), (375, 500), (333, 500), (500, 281)} <= set(sizes.values())
    tfds_dir = voc_home / "tfds"
    train = split_ids(tfds_dir, "voc2012_wsss", "train_aug")
    val = split_ids(tfds_dir, "voc2012_wsss", "val")
    assert len(train) == 7 and len(val) == 3
    workdir = voc_home / "W1"
    for split, ids in (("train", train), ("val", val)):
        check_cams(workdir / "cams" / split, sizes, ids)
    # PPMG (trained on) and the cyclic masks cover train_aug; the other variants are made only
    # for the images they are scored on, pseudo.eval_split (VOC's train split, VOC ground truth).
    scored = split_ids(tfds_dir, "voc2012_wsss", "train")
    assert 0 < len(scored) < len(train) and set(scored) <= set(train)
    assert safe_io.read_json(str(workdir / "results.json"))["pseudo_mask_eval"] == {
        "split": "train", "num_images": len(scored)}
    for variant in PSEUDO_VARIANTS + ("cycle1",):
        ids = train if variant in ("ppmg", "cycle1") else scored
        check_masks(workdir / "pseudo" / variant / "train", sizes, ids, 21)
    for run in ("pus", "cycle1"):
        check_masks(workdir / "predictions" / run / "val", sizes, val, 21)
    check_results(workdir, {"pus", "cycle1"}, {"cls", "cam", "pseudo", "seg", "cycle", "eval"})
    rough = workdir / "rough_masks" / "train"
    assert sorted(p.stem for p in rough.glob("*.png")) == train
    config = safe_io.read_json(str(workdir / "config.json"))
    assert config["cls"]["method"] == "seam" and config["cam"]["method"] == "multicrop"
    assert config["seg"]["model"]["backbone"]["name"] == "res2net101"
    assert config["eval"]["crf"] and config["eval"]["flip"] and config["eval"]["sliding_window"]


def test_coco_rehearsal_outputs(coco_home):
    """Every stage of configs/coco.py:rehearsal on a COCO-shaped tree."""
    coco_home, log = coco_home
    check_random_init_warnings(log)
    sizes = {**image_sizes(coco_home / "data" / "coco" / "train2014"),
             **image_sizes(coco_home / "data" / "coco" / "val2014")}
    tfds_dir = coco_home / "tfds"
    train = split_ids(tfds_dir, "coco2014_wsss/contiguous", "train")
    val = split_ids(tfds_dir, "coco2014_wsss/contiguous", "val")
    assert len(train) == 6 and len(val) == 3
    workdir = coco_home / "C"
    for split, ids in (("train", train), ("val", val)):
        check_cams(workdir / "cams" / split, sizes, ids)
    for variant in PSEUDO_VARIANTS:
        check_masks(workdir / "pseudo" / variant / "train", sizes, train, 81)
    check_masks(workdir / "predictions" / "pus" / "val", sizes, val, 81)
    # COCO has no cyclic round (cycle.num_cycles=0): its cycle stage runs and trains nothing.
    check_results(workdir, {"pus"}, {"cls", "cam", "pseudo", "seg", "cycle", "eval"})


def test_documented_commands_parse_and_name_the_dataset():
    """Every ``main`` / rough-mask command of docs/multicrop.md and docs/rehearsal.md is
    accepted by the locked config as written (each override key exists and type-checks) and
    gives ``--config.data.data_dir=~/tfds`` (the rough masks' ``--run_config``: the
    rehearsed ``prepare``'s ``--data_dir``); the rough-mask line of multicrop.md and the ``prepare`` lines of docs/datasets.md are
    rehearsed ones, up to ``:rehearsal``."""
    rehearsed = [shlex.split(c) for block in documented_commands(DOCS / "rehearsal.md")
                 for c in block]
    recipe = documented_commands(DOCS / "multicrop.md")[0]
    assert len(recipe) == 3
    for args in [shlex.split(c) for c in recipe] + rehearsed:
        if args[:3] == ["python", "-m", "pmm_jax.pseudo_masks"]:
            assert args[3] == "--method=rough", args
            args = [a.replace("--run_config", "--config", 1) for a in args]
        if args[:3] in (["python", "-m", "pmm_jax.main"], ["python", "-m", "pmm_jax.pseudo_masks"]):
            assert "--config.data.data_dir=~/tfds" in args, args
            config_args = [a.replace("configs/", f"{ROOT}/configs/", 1) for a in args
                           if a.startswith("--config")]
            parse_config(*config_args)  # an unknown key or a bad value raises
    (rough,) = [c for c in recipe if "pmm_jax.pseudo_masks --method=rough" in c]
    assert shlex.split(rough.replace("configs/voc.py", "configs/voc.py:rehearsal")) in rehearsed
    prepare = [line for line in (DOCS / "datasets.md").read_text().splitlines()
               if line.startswith("python -m pmm_jax.data.prepare")]
    assert len(prepare) == 2
    for command in prepare:
        assert shlex.split(command) in rehearsed, f"docs/datasets.md: {command}"


def parse_config(*argv: str):
    """The locked config ``python -m pmm_jax.main`` would get from these flags."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["main", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("path", ["configs/voc.py", "configs/coco.py"])
def test_paper_networks_shrink_from_the_command_line(path):
    """The paper configs' backbone dicts hold their size keys at the builders' defaults (the
    official networks), and size overrides on the locked config build smaller networks, for
    each segmenter name those keys fit."""
    import inspect

    from flax import nnx

    from pmm_jax import models

    paper = parse_config(f"--config={ROOT / path}")
    for backbone, builder in ((paper.cls.model.backbone, models.ResNet38),
                              (paper.seg.model.backbone, models.Res2Net)):
        defaults = {k: p.default for k, p in inspect.signature(builder.__init__).parameters.items()}
        assert {"width_div", "blocks"} <= set(backbone)
        for key, value in backbone.items():
            if key != "name":
                assert value == defaults[key], (backbone.name, key)

    def build(cfg):
        return nnx.eval_shape(lambda: models.build_backbone(cfg, models.init_rngs(0)))

    small = parse_config(f"--config={ROOT / path}", "--config.cls.model.backbone.width_div=16",
                         "--config.cls.model.backbone.blocks=(1, 1, 1, 1)",
                         "--config.seg.model.backbone.width_div=16",
                         "--config.seg.model.backbone.blocks=(1, 1, 1, 1)")
    assert build(small.cls.model.backbone).out_channels == (8, 16, 32, 64, 128, 256)
    for name in ("res2net101", "resnet101"):
        seg = models.segmenter_backbone_config({**small.seg.model.backbone, "name": name})
        assert build(seg).out_channels == (16, 32, 64, 128), name
