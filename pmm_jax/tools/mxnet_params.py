"""MXNet ``.params`` files (``mxnet.nd.save`` NDArray lists) read with numpy alone, and the
ResNet38-d names of SEAM's ``convert_mxnet_to_torch``.

The ImageNet ResNet38-d weights that SEAM/PMM users download,
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``, are such a file, and MXNet 1.9 does not install
beside numpy 2; ``pmm_jax.convert`` reads them through this module (no mxnet, no torch).

The layout (MXNet ``src/ndarray/ndarray.cc``, ``NDArray::Save``/``Load``; little-endian):

    uint64 0x112 (list magic), uint64 reserved
    uint64 n, then n arrays, each
        V2 (uint32 0xF993FAC9): int32 storage type (0 dense), shape, context, int32 dtype, data
        V1 (uint32 0xF993FAC8): shape, context, int32 dtype, data
        legacy (no magic):     uint32 ndim, ndim x uint32 dims, context, int32 dtype, data
      with shape = int32 ndim + ndim x int64 dims (ndim <= 0: an empty array, nothing follows),
      context = int32 dev_type (1 cpu, 2 gpu, 3 cpu_pinned, 5 cpu_shared) + int32 dev_id,
      dtype = mshadow type flag (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8,
      6 int64, 7 bool) and data = the C-order values
    uint64 m (0 or n), then m names, each uint64 length + bytes ("arg:"/"aux:" prefixed when
    saved by a Module: parameters and BN moving statistics)

Sparse arrays (storage types 1, 2) never hold network weights and are refused.
"""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
          6: np.int64, 7: np.bool_}
DEV_TYPES = {1: "cpu", 2: "gpu", 3: "cpu_pinned", 5: "cpu_shared"}
PREFIXES = ("arg:", "aux:")


def is_ndarray_list(path: str) -> bool:
    """True when ``path`` starts with the NDArray-list magic (uint64 0x112)."""
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and struct.unpack("<Q", head)[0] == LIST_MAGIC


class _Reader:
    """Sequential little-endian reads that name the file and offset when it is cut short."""

    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def bytes(self, n: int) -> bytes:
        """The next ``n`` bytes; a size the file cannot hold (a truncated file, or a damaged
        one claiming a 200000x200000 array) is refused before anything is allocated."""
        offset = self.f.tell()
        if n > self.size - offset:
            raise ValueError(f"{self.path}: MXNet NDArray list cut short or damaged (wanted {n} "
                             f"bytes at offset {offset}, the file has {self.size})")
        return self.f.read(n)

    def scalar(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt)))[0]

    def array(self, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.bytes(np.dtype(dtype).itemsize * count), dtype, count)


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    """One ``NDArray::Load`` record (V2, V1 or legacy) as a numpy array."""
    magic = r.scalar("I")
    if magic == NDARRAY_V2_MAGIC:
        stype = r.scalar("i")
        if stype != 0:
            raise ValueError(f"{r.path}: array {index} has storage type {stype} (sparse); only "
                             "dense arrays (storage type 0) are supported")
    if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC):
        ndim = max(0, r.scalar("i"))  # MXNet >= 1.6 writes -1 for an unknown shape
        shape = tuple(int(d) for d in r.array("<i8", ndim))
    else:  # legacy: the first word is ndim, dims are uint32
        ndim = magic
        if ndim > 32:
            raise ValueError(f"{r.path}: array {index} starts with {magic:#x}, neither an "
                             "NDArray magic nor a plausible legacy ndim")
        shape = tuple(int(d) for d in r.array("<u4", ndim))
    if ndim == 0:
        return np.zeros((0,), np.float32)
    dev_type, _dev_id = r.scalar("i"), r.scalar("i")
    if dev_type not in DEV_TYPES:
        raise ValueError(f"{r.path}: array {index} has context dev_type {dev_type}; known: "
                         f"{DEV_TYPES}")
    flag = r.scalar("i")
    if flag not in DTYPES:
        raise ValueError(f"{r.path}: array {index} has dtype flag {flag}; supported: "
                         f"{ {k: np.dtype(v).name for k, v in DTYPES.items()} }")
    dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
    return r.array(dtype, int(np.prod(shape))).reshape(shape)


def load_ndarray_list(path: str) -> dict[str, np.ndarray]:
    """``{name: array}`` of an ``mxnet.nd.save`` file, names as stored (``arg:``/``aux:``).

    ValueError naming the file when it is not an NDArray list, is cut short, holds sparse or
    unsupported arrays, or has no names (an unnamed list cannot be mapped to a network).
    """
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(8) != struct.pack("<Q", LIST_MAGIC):
            raise ValueError(f"{path} is not an MXNet NDArray list (no 0x112 header)")
        r.scalar("Q")  # reserved
        arrays = [_read_ndarray(r, i) for i in range(r.scalar("Q"))]
        try:
            names = [r.bytes(r.scalar("Q")).decode("utf-8") for _ in range(r.scalar("Q"))]
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: an array name is not UTF-8 ({err}); the file is "
                             "damaged") from err
    if len(names) != len(arrays):
        raise ValueError(f"{path} holds {len(arrays)} arrays but {len(names)} names; "
                         "an unnamed NDArray list cannot be mapped to a network")
    if len(set(names)) != len(names):
        raise ValueError(f"{path} repeats array names")
    return dict(zip(names, arrays))


# SEAM's convert_mxnet_to_torch, name by name: res<s><blk>_<branch>_weight is a conv,
# bn<s><blk>_<branch>_<gamma|beta|moving_mean|moving_var> a BN; block "a" is b<s>, "b<i>" b<s>_<i>.
_BLOCK = re.compile(r"^(res|bn)(\d)(a|b\d+)_(branch[0-9a-z]+)_"
                    r"(weight|gamma|beta|moving_mean|moving_var)$")
_BN_LEAF = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
            "moving_var": "running_var"}


def resnet38_torch_name(mx_name: str) -> str:
    """The PSA/SEAM PyTorch key of a ResNet38-d MXNet name, as SEAM's converter gives it:
    ``arg:res2b1_branch2a_weight`` -> ``b2_1.conv_branch2a.weight``,
    ``aux:bn4a_branch1_moving_var``... -> ``b4.bn_...``, ``arg:bn7_gamma`` -> ``bn7.weight``.
    Any other name (the ImageNet head ``linear1000``, which SEAM drops) is returned unchanged,
    so the converter reports it among the ignored keys as it does a .pth's ``fc``."""
    name = mx_name.split(":", 1)[1] if mx_name.startswith(PREFIXES) else mx_name
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_") and name[4:] in _BN_LEAF:
        return "bn7." + _BN_LEAF[name[4:]]
    m = _BLOCK.match(name)
    if not m:
        return mx_name
    kind, stage, block, branch, leaf = m.groups()
    module = f"b{stage}" if block == "a" else f"b{stage}_{block[1:]}"
    if kind == "res" and leaf == "weight":
        return f"{module}.conv_{branch}.weight"
    if kind == "bn" and leaf in _BN_LEAF:
        return f"{module}.bn_{branch}.{_BN_LEAF[leaf]}"
    return mx_name


def resnet38_state_dict(path: str) -> dict[str, np.ndarray]:
    """The ResNet38-d ImageNet ``.params`` file as a PyTorch-named state dict (SEAM's names)."""
    state = {}
    for mx_name, array in load_ndarray_list(path).items():
        key = resnet38_torch_name(mx_name)
        if key in state:
            raise ValueError(f"{path}: {mx_name} and another array both map to {key}")
        state[key] = array
    return state


STATE_DICT_READERS = {"resnet38": resnet38_state_dict}
