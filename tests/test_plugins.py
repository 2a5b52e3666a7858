"""Methods added from outside the package through the registries: a toy CAM method, a toy
segmentation loss and a toy dataset kind, registered by a module of the test's own folder
named in ``config.plugins``, run through ``python -m pmm_jax.main`` on the tiny config and are
planned, validated and recorded like the built-in ones; a misspelt name is refused at
start-up with the registered names listed."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent('''
    """Toy methods of a researcher's own package (registered on import)."""
    import os

    import numpy as np

    from pmm_jax.cams.methods import CAM_METHODS
    from pmm_jax.constants import SYNTHETIC_CLASSES
    from pmm_jax.data import builder_base, kinds
    from pmm_jax.segmentation.losses import SEG_LOSSES


    def note(what):
        with open(os.environ["TOY_LOG"], "a") as f:
            f.write(what + "\\n")


    @CAM_METHODS.register("toy_cam")
    def toy_cam(cam_config, model, model_cam):
        """Every present class's CAM is 1 over the image: the label, broadcast."""
        note("cam")

        def predict(batch, rows):
            b, h, w = batch["image"].shape[:3]
            inside = ((np.arange(h)[None, :, None] < batch["height"][:, None, None])
                      & (np.arange(w)[None, None, :] < batch["width"][:, None, None]))
            return (inside[..., None] * batch["labels"][:, None, None, :]).astype(np.float32)
        return predict


    @SEG_LOSSES.register("toy_loss")
    def toy_loss(config):
        """Half the built-in cross-entropy."""
        note("loss")
        ce = SEG_LOSSES.get("ce")(config)

        def loss_fn(model, batch, rngs):
            loss, metrics = ce(model, batch, rngs)
            return 0.5 * loss, metrics
        return loss_fn


    def open_toy(data_config, data_dir):
        """The tiny synthetic images under another kind with its own class names."""
        note("data")
        builder_base.prepare("synthetic_wsss/tiny", data_dir)
        return {"name": "synthetic_wsss/tiny", "class_names": TOY_CLASSES}


    TOY_CLASSES = ("background", "a", "b", "c", "d", "e")
    assert len(TOY_CLASSES) == len(SYNTHETIC_CLASSES)
    kinds.DATASET_KINDS.register("toy_wsss", kinds.DatasetKind(
        open=open_toy, class_names={"toy": TOY_CLASSES}, names="toy_wsss/<anything>",
        defaults=kinds.data_config("synthetic_wsss", name="toy_wsss/tiny", class_names="toy")))
''')

CONFIG = textwrap.dedent('''
    """The tiny demo with the toy methods; variant "misspelt" names each one wrongly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", {demo!r})
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)


    def get_config(variant="ok"):
        c = demo.get_config("tiny")
        typo = variant == "misspelt"
        c.plugins = "toy_methods"
        c.data.update(dict(name="toy_wsss/tiny" if not typo else "toy_wsssx/tiny",
                           class_names="toy"))
        c.cam.method = "toy_cma" if typo else "toy_cam"
        c.seg.runs = ("toy_los",) if typo else ("toy_loss",)
        c.cycle.update(dict(num_cycles=0, source=c.seg.runs[0]))
        c.cls.num_steps = c.seg.num_steps = 4
        c.pseudo.update(dict(variants=("ppmg",), train_on="ppmg", eval_subset=4))
        c.eval.update(dict(scales=(1.0,), flip=False, crf=False, sliding_window=None))
        return c
''')


def run_main(tmp_path, variant: str):
    (tmp_path / "toy_methods.py").write_text(PLUGIN)
    config = tmp_path / "toy_config.py"
    config.write_text(CONFIG.format(demo=str(ROOT / "configs" / "demo.py")))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOY_LOG=str(tmp_path / "toy.log"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pmm_jax.main", f"--config={config}:{variant}",
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_toy_methods_run_plan_and_record_like_built_in_ones(tmp_path):
    proc = run_main(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((tmp_path / "toy.log").read_text().split()) == ["cam", "data", "loss"]
    run = tmp_path / "run"
    markers = {stage: json.loads((run / "stages" / f"{stage}.json").read_text())
               for stage in ("cls", "cam", "pseudo", "seg", "eval")}
    assert markers["cam"]["config"]["cam.method"] == "toy_cam"
    assert markers["seg"]["outputs"] == {"seg/toy_loss/ckpt": 4}
    assert markers["seg"]["inputs"]["pseudo"] == markers["pseudo"]["id"]
    results = json.loads((run / "results.json").read_text())
    assert list(results["seg_miou"]) == ["toy_loss"]
    assert json.loads((run / "dataset.json").read_text())["class_names"][1] == "a"
    cam_file = next((run / "cams" / "val").glob("*.npy"))
    cams = np.load(cam_file, allow_pickle=True).item()
    assert cams and all(np.allclose(np.asarray(v, np.float32), 1, atol=1e-3)
                        for v in cams.values())

    again = run_main(tmp_path, "ok")  # planned like the built-ins: complete, so skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already complete") == 6, again.stderr[-3000:]


def test_misspelt_names_are_refused_at_start_up_listing_the_registered_ones(tmp_path):
    proc = run_main(tmp_path, "misspelt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.cam.method='toy_cma'" in proc.stderr
    assert "'multiscale', 'multicrop', 'toy_cam'" in proc.stderr
    assert "config.seg.runs=('toy_los',)" in proc.stderr and "'ce', 'pus', 'toy_loss'" in proc.stderr
    assert "unknown dataset kind 'toy_wsssx'" in proc.stderr and "'toy_wsss'" in proc.stderr
    assert not (tmp_path / "run" / "stages").exists()
