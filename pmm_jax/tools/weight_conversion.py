"""PyTorch or MXNet weights -> pretrained backbone checkpoint that a config loads with one key.

    pip install torch   # reading a .pth needs it; nothing else in pmm_jax does
    python -m pmm_jax.convert --arch=resnet38 --src=resnet38d.pth --out=~/ckpt/resnet38
    python -m pmm_jax.convert --arch=resnet38 --src=ilsvrc-cls_rna-a1_cls1000_ep-0001.params \\
        --out=~/ckpt/resnet38   # the MXNet ImageNet file of PSA/SEAM/PMM: numpy only
    python -m pmm_jax.convert --arch=scalenet101 --src=scalenet101.pth \\
        --structure=scalenet101.json --out=~/ckpt/scalenet101
    python -m pmm_jax.main ... --config.cls.model.init_from=~/ckpt/resnet38

The source format is read from the file's first bytes: a PyTorch state dict (``torch.save``
zip or legacy pickle) or an MXNet NDArray list (``mxnet.nd.save``, read by
``pmm_jax.tools.mxnet_params`` and renamed as SEAM's ``convert_mxnet_to_torch`` does). The
weights table with download locations is the README's "ImageNet weights" section.

The backbones name their submodules after the official PyTorch modules, so a tensor's
PyTorch key and its path in the Flax model are the same string up to the leaf name
(``weight`` -> ``kernel`` for convs, ``weight``/``running_mean``/``running_var`` ->
``scale``/``mean``/``var`` for BN) and the conv layout (OIHW -> HWIO). A converter is
therefore "build the abstract backbone, map every one of its leaves"; adding an architecture
is one entry in ``CONVERTERS`` (``arch -> function(state_dict, structure) -> backbone``,
returning the shape-only backbone whose weights the state dict must fill).

Every backbone leaf must be present with the right shape, otherwise a ValueError lists the
missing keys, the keys the checkpoint has instead and the shape mismatches (a checkpoint of
another network, or a ScaleNet structure json that does not fit the weights). Extra keys
alone (an ImageNet classifier head) are ignored and reported.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np
from flax import nnx

from pmm_jax import models
from pmm_jax.models import pretrained, res2net, resnet_v1c
from pmm_jax.tools import mxnet_params

# Flax leaf name -> PyTorch leaf name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def torch_key(flax_key: str) -> str:
    """The PyTorch state-dict key of a dotted Flax weight path."""
    module, leaf = flax_key.rsplit(".", 1)
    return f"{module}.{_TORCH_LEAF[leaf]}"


def torch_layout(flax_key: str, shape: tuple) -> tuple:
    """The PyTorch shape of a Flax weight: conv kernels HWIO -> OIHW, everything else equal."""
    if flax_key.endswith(".kernel") and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def from_torch_layout(array: np.ndarray) -> np.ndarray:
    """OIHW conv weights -> HWIO; other arrays unchanged."""
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def convert_state_dict(backbone: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                       what: str, hint: str = "") -> dict[str, np.ndarray]:
    """``{flax dotted path: float32 array}`` for every weight of ``backbone`` from ``state_dict``.

    ``backbone`` may be abstract (``nnx.eval_shape``); only its paths and shapes are read.
    """
    targets = {k: tuple(v.shape) for k, v in pretrained.flat_weights(backbone).items()}
    by_torch = {torch_key(k): k for k in targets}
    found = {k: tuple(np.shape(v)) for k, v in state_dict.items()
             if not k.endswith(_IGNORED_SUFFIXES)}
    pretrained.check_same_layout({t: torch_layout(k, targets[k]) for t, k in by_torch.items()},
                                 found, what=what, hint=hint, allow_unexpected=True)
    return {k: from_torch_layout(np.asarray(state_dict[t], np.float32))
            for t, k in by_torch.items()}


def unexpected_keys(backbone: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """State-dict keys the backbone does not use (reported, not an error)."""
    used = {torch_key(k) for k in pretrained.flat_weights(backbone)}
    return sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))


def _width_div(state_dict: Mapping, stem_key: str, stem_width: int = 64) -> int:
    """Channel divisor of a (possibly slimmed) network from its stem width; 1 if unknown."""
    if stem_key not in state_dict:
        return 1
    return max(1, stem_width // int(np.shape(state_dict[stem_key])[0]))


def _resnet38(state_dict: Mapping, structure: str | None) -> nnx.Module:
    """Shape-only ResNet38-d with the width and depth found in the state dict (the official
    network for the published weights); dilations do not change the weights."""
    if structure:
        raise ValueError("--structure is only for scalenet architectures, not resnet38")
    blocks = tuple(max(1, len({k.split(".")[0] for k in state_dict
                               if k.split(".")[0] == f"b{s}" or k.startswith(f"b{s}_")}))
                   for s in (2, 3, 4, 5))
    width_div = _width_div(state_dict, "conv1a.weight")
    return nnx.eval_shape(lambda: models.ResNet38(width_div=width_div, blocks=blocks,
                                                  rngs=models.init_rngs(0)))


def _scalenet101(state_dict: Mapping, structure: str | None) -> nnx.Module:
    """Shape-only ScaleNet with the branch widths of ``structure`` and the width and depth
    found in the state dict (ScaleNet101 for the published weights)."""
    if not structure:
        raise ValueError("scalenet101 needs --structure=<scalenet101.json> (the published "
                         "structure of the checkpoint)")
    layers = tuple(max(1, len({k.split(".")[1] for k in state_dict
                               if k.startswith(f"layer{n}.")})) for n in (1, 2, 3, 4))
    width_div = _width_div(state_dict, "conv1.weight")
    return nnx.eval_shape(lambda: models.scalenet101(
        structure=structure, layers=layers, width_div=width_div, rngs=models.init_rngs(0)))


CONVERTERS: dict[str, Callable[[Mapping, str | None], nnx.Module]] = {
    "resnet38": _resnet38,
    "scalenet101": _scalenet101,
    "resnet50": resnet_v1c.torch_converter,
    "resnet101": resnet_v1c.torch_converter,
    "res2net101": res2net.torch_converter,
}


def load_torch_state_dict(src: str) -> dict[str, np.ndarray]:
    """A .pth file as ``{key: numpy array}``: unwraps ``{"state_dict": ...}``,
    ``{"model": {"main": ...}}`` (PSA/SEAM) and DataParallel's ``module.`` prefix."""
    try:
        import torch  # noqa: PLC0415 (optional dependency, only for converting)
    except ImportError as e:
        raise ImportError("converting PyTorch weights needs torch: pip install torch") from e
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False: never needed here
        raise ValueError(
            f"{src} could not be read as a PyTorch state dict with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). A state dict "
            "holds only tensors; re-save the network's weights with "
            "torch.save(model.state_dict(), PATH)") from None
    for wrapper in ("state_dict", "model", "main"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    return {(k[len("module."):] if k.startswith("module.") else k): v.detach().cpu().numpy()
            for k, v in obj.items() if hasattr(v, "detach")}


ACCEPTED_FORMATS = ("a PyTorch state dict (.pth, torch.save: zip or legacy pickle) or an MXNet "
                    "NDArray list (.params, mxnet.nd.save; --arch="
                    + "/".join(sorted(mxnet_params.STATE_DICT_READERS)) + " only)")


def source_format(src: str) -> str:
    """``"mxnet"`` or ``"torch"`` from the file's first bytes; ValueError naming the file and
    the accepted formats for anything else."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--src {src}: no such file")
    if mxnet_params.is_ndarray_list(src):
        return "mxnet"
    with open(src, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or head[:1] == b"\x80":  # zip archive or pickle protocol >= 2
        return "torch"
    raise ValueError(f"{src} is in none of the formats pmm_jax.convert reads: {ACCEPTED_FORMATS}")


def load_state_dict(src: str, arch: str) -> dict[str, np.ndarray]:
    """``src`` as a PyTorch-named ``{key: numpy array}``, whichever accepted format it is in."""
    if source_format(src) == "torch":
        return load_torch_state_dict(src)
    if arch not in mxnet_params.STATE_DICT_READERS:
        raise ValueError(f"{src} is an MXNet NDArray list, but MXNet names are only known for "
                         f"--arch={'/'.join(sorted(mxnet_params.STATE_DICT_READERS))}; "
                         f"convert the {arch} weights to a PyTorch .pth")
    return mxnet_params.STATE_DICT_READERS[arch](src)


def convert(arch: str, src: str, out: str, structure: str | None = None) -> dict:
    """Converts ``src`` (a .pth or MXNet .params of ``arch``) into the pretrained checkpoint
    ``out``; returns the metadata written (also ``out/pretrained.json``)."""
    if arch not in CONVERTERS:
        raise ValueError(f"unknown --arch {arch!r}; known: {sorted(CONVERTERS)}")
    state_dict = load_state_dict(src, arch)
    backbone = CONVERTERS[arch](state_dict, structure)
    hint = (f"is {src} a {arch} checkpoint"
            + (f" and does --structure={structure} belong to it?" if structure else "?"))
    arrays = convert_state_dict(backbone, state_dict, what=src, hint=hint)
    meta = {"arch": arch, "source": os.path.abspath(src),
            "structure": os.path.abspath(structure) if structure else None,
            "num_params": models.count_params(backbone),
            "ignored_keys": unexpected_keys(backbone, state_dict)}
    pretrained.save_pretrained(arrays, out, meta)
    return meta
