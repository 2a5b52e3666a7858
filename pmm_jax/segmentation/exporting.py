"""A segmenter's forward pass as a serialized ``jax.export`` artifact (``pmm_jax.export``).

The artifact is the run's test-time pipeline without the CRF (``config.eval``'s sliding
window, scales and flip, softmax-averaged, then argmax) on one canvas-sized image:
``f(weights, image float32 [1, H, W, 3]) -> uint8 [H, W]``, lowered for every platform in
``PLATFORMS`` that this jax can lower for. The weights are its arguments, stored beside it in
``weights.npz`` (a few hundred MB for the paper's Res2Net-101 would not belong inside the
program). ``meta.json`` says how to feed it: class names, palette, canvas, normalisation.
``pmm_jax.export.load`` runs it with jax and numpy alone.

Files written to the output folder:
  ``segmenter.jax_export``  ``jax.export.Exported.serialize()`` bytes
  ``weights.npz``           the weight arrays ``w0, w1, ...`` in argument order
  ``meta.json``             see :func:`meta`
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pmm_jax.constants import PALETTE
from pmm_jax.files import safe_io
from pmm_jax.segmentation import canvas, inference

PROGRAM = "segmenter.jax_export"
WEIGHTS = "weights.npz"
META = "meta.json"
FORMAT = "pmm_jax.export/1"
# Lowered for each of these that this jax can lower for (a CPU-only jaxlib lowers for CUDA and
# TPU too: lowering needs no device). The artifact runs on any one of them.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def forward(model: nnx.Module, eval_cfg) -> tuple[callable, list[np.ndarray]]:
    """``(fn, weights)``: ``fn(weights, image [1, H, W, 3]) -> uint8 [H, W]``, the pipeline
    of ``eval_cfg`` without the CRF on ``model`` (eval mode), and its weights as numpy."""
    options = inference.eval_options(eval_cfg)  # the same scales, flip, window
    graphdef, weights, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
    leaves, treedef = jax.tree.flatten(weights)
    rest = jax.device_get(rest)

    def fn(flat: Sequence[jax.Array], image: jax.Array) -> jax.Array:
        eval_model = nnx.merge(graphdef, jax.tree.unflatten(treedef, list(flat)), rest)
        eval_model.eval()
        probs = inference.averaged_probs(lambda x: eval_model(x)["logits"], image, **options)
        return jnp.argmax(probs, axis=-1).astype(jnp.uint8)[0]

    return fn, [np.asarray(jax.device_get(leaf)) for leaf in leaves]


def export_for_platforms(fn, args) -> jax.export.Exported:
    """``fn`` exported for every platform of ``PLATFORMS`` at once or, when this jax cannot
    lower it for one of them, for those it can (CPU at least)."""
    try:
        return jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
    except Exception:  # noqa: BLE001 (an unavailable lowering raises various errors)
        pass
    found = []
    for platform in PLATFORMS:
        try:
            jax.export.export(jax.jit(fn), platforms=(platform,))(*args)
            found.append(platform)
        except Exception:  # noqa: BLE001
            if platform == "cpu":
                raise
    return jax.export.export(jax.jit(fn), platforms=tuple(found))(*args)


def meta(class_names: Sequence[str], canvas_size: Sequence[int], eval_cfg, run: str,
         platforms: Sequence[str]) -> dict:
    """``meta.json``: what a server needs to feed the artifact and read its output."""
    window = eval_cfg.get("sliding_window")
    return {
        "format": FORMAT,
        "run": run,
        "class_names": list(class_names),
        "palette": PALETTE[:len(class_names)].tolist(),
        "canvas": list(canvas_size),
        "input": ("uint8 RGB [H, W, 3] of any size: an image larger than the canvas is shrunk, "
                  "aspect kept, to fit it (antialiased linear filter, rounded to uint8), "
                  "normalised, and padded at the bottom/right with 0 to the canvas; the "
                  "program takes float32 [1, canvas_h, canvas_w, 3]; the labels of the covered "
                  "region go back to the image's size by nearest neighbour "
                  "(pmm_jax/segmentation/canvas.py)"),
        "output": "uint8 [canvas_h, canvas_w] class indices (0 background, i class_names[i])",
        "normalisation": {"scale": 1 / 255, "mean": canvas.MEAN.tolist(),
                          "std": canvas.STD.tolist(),
                          "formula": "(image / 255 - mean) / std, float32, RGB order"},
        "test_time": {"scales": [float(s) for s in eval_cfg.get("scales", (1.0,))],
                      "flip": bool(eval_cfg.get("flip", False)),
                      "sliding_window": list(window) if window else None, "crf": False},
        "platforms": list(platforms),
    }


def export_segmenter(model: nnx.Module, eval_cfg, class_names: Sequence[str],
                     canvas_size: Sequence[int], run: str, out_dir: str) -> dict:
    """Writes the artifact, weights and ``meta.json`` of ``model`` to ``out_dir``; returns
    the meta."""
    fn, weights = forward(model, eval_cfg)
    height, width = canvas_size
    args = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
            jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
    exported = export_for_platforms(fn, args)
    os.makedirs(out_dir, exist_ok=True)
    safe_io.write_bytes(os.path.join(out_dir, PROGRAM), bytes(exported.serialize()))
    with safe_io.atomic_path(os.path.join(out_dir, WEIGHTS)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"w{i}": w for i, w in enumerate(weights)})
    record = meta(class_names, canvas_size, eval_cfg, run, exported.platforms)
    safe_io.write_json(os.path.join(out_dir, META), record)
    return record
