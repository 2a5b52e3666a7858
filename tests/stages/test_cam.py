"""Tests of stage ``cam`` (pmm_jax/stages/cam.py) that need no trained classifier."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from pmm_jax.cams import classifier
from pmm_jax.files import safe_io
from pmm_jax.files.workdir import Workdir
from pmm_jax.stages import cam


def tiny_config(method: str):
    """configs/demo.py:tiny with CAM ``method``; multi-crop on one 32-pixel tile scale."""
    config = configs.get_config("demo", "tiny")
    config.cam.method = method
    config.cam.batch_size = 4
    config.cam.multicrop.update(dict(scales=(1.0,), tile_batch=4))
    return config


def eval_batch() -> dict:
    """One padded eval batch of four 40x36 images, the last row padding."""
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 5), np.float32)
    labels[:, 1] = 1.0
    return {"image": rng.normal(size=(4, 40, 36, 3)).astype(np.float32),
            "raw": rng.integers(0, 256, (4, 40, 36, 3), dtype=np.uint8),
            "height": np.array([40, 33, 40, 40], np.int32),
            "width": np.array([36, 36, 29, 36], np.int32), "labels": labels,
            "valid": np.array([True, True, True, False]),
            "id": np.array([b"img0", b"img1", b"img2", b""])}


@pytest.mark.parametrize("method", ["multiscale", "multicrop"])
def test_cam_stage_refuses_non_finite_cams_from_nan_weights(tmp_path, method):
    config = tiny_config(method)
    model = classifier.build_model(config)
    nnx.update(model, jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan),
                                             nnx.state(model, nnx.Param)))
    model.eval()
    data = types.SimpleNamespace(eval_batches=lambda *args: iter([eval_batch()]),
                                 num_eval_batches=lambda *args: 1)
    wd = Workdir(str(tmp_path))
    with pytest.raises(safe_io.NonFiniteError,
                       match=rf"stage 'cam' \({method}\): the CAMs of val image img0 .*"
                       r"trained by stage 'cls'.*not finite.*refusing to write"):
        cam.write_split(config, wd, data, model, "val")
    assert not list(tmp_path.rglob("*.npy")), "no CAM file may be written"
