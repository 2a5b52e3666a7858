"""Mixed precision: the compute dtype of a built model (config key ``compute_dtype``).

``compute_dtype`` is "float32", "bfloat16" or "auto" (bfloat16 when ``jax.default_backend()``
is a GPU or TPU, float32 on the CPU, where bfloat16 convolutions are emulated and slower).
:func:`set_compute_dtype` walks a built model once and sets the *compute* dtype of every
layer (flax's ``dtype=``); parameters are created float32 and stay float32 (``param_dtype``),
so gradients, optimizer state and checkpoints are float32 whatever the setting, and a
checkpoint trained in one precision loads in the other.

What runs in the compute dtype: every convolution (inputs and kernel cast to it, output in it)
and the BatchNorm outputs. What stays float32:

* BatchNorm statistics: the batch mean/variance are reduced in float32 (flax promotes), the
  running averages are float32 variables, and the normalisation itself is computed in float32
  and only its result cast (``_normalize_in_float32``);
* the layers a head names in ``float32_layers`` (the CAM and segmentation classifiers, cheap
  1x1 convs): their input is promoted, so CAMs and logits are float32;
* everything downstream of those outputs (losses, log-softmax, the SEAM PCM's normalisation
  and affinity, CAM max-normalisation, multi-scale/multi-crop CAM fusion, pseudo-masks),
  because it only ever sees float32 arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pmm_jax.models.backbone import FrozenBatchNorm

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def resolve(name: str, backend: str | None = None) -> jnp.dtype:
    """The dtype of a ``compute_dtype`` setting; "auto" is bfloat16 on a GPU/TPU ``backend``
    (default ``jax.default_backend()``), else float32. ValueError names the config key."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name == "auto":
        backend = backend or jax.default_backend()
        name = "bfloat16" if backend in _ACCELERATORS else "float32"
    return jnp.dtype(name)


def config_dtype(config) -> jnp.dtype:
    """The resolved ``config.compute_dtype`` (float32 when a config has no such key)."""
    return resolve(config.get("compute_dtype", "float32"))


def _normalize_in_float32(arrays: tuple, dtype: Any = None, **_) -> tuple:
    """``promote_dtype`` for ``nnx.BatchNorm``: promotes nothing to the compute dtype, so the
    statistics and the normalisation are computed in (at least) float32; the layer's ``dtype``
    still sets the dtype of its output."""
    return arrays


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Sets the compute dtype of every conv/dense/norm layer of ``model`` (in place) and
    returns it; layers named in their parent's ``float32_layers`` compute in float32."""
    dtype = jnp.dtype(dtype)
    modules = dict(nnx.iter_modules(model))
    for path, module in modules.items():
        parent = modules.get(path[:-1]) if path else None
        keep = path and str(path[-1]) in getattr(parent, "float32_layers", ())
        layer_dtype = jnp.dtype(jnp.float32) if keep else dtype
        if isinstance(module, nnx.BatchNorm):
            module.dtype = layer_dtype
            module.promote_dtype = _normalize_in_float32
        elif isinstance(module, (nnx.Conv, nnx.Linear, FrozenBatchNorm)):
            module.dtype = layer_dtype
    return model
