"""pmm_jax.tools.mxnet_params: MXNet NDArray-list files written here from the format's specification
(``NDArray::Save`` in MXNet's src/ndarray/ndarray.cc), read back with numpy only, and the
ResNet38-d ImageNet weights converted through them exactly as through a ``.pth``.
"""

import pathlib
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pmm_jax import convert, models
from pmm_jax.models import pretrained
from pmm_jax.tools import mxnet_params, weight_conversion

FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
         np.dtype(np.uint8): 3, np.dtype(np.int32): 4, np.dtype(np.int8): 5,
         np.dtype(np.int64): 6, np.dtype(np.bool_): 7}


def ndarray_record(array, layout="v2", dev_type=1, dev_id=0, stype=0, flag=None):
    """One NDArray as ``NDArray::Save`` writes it (v2), or as MXNet's V1 / legacy files did."""
    array = np.ascontiguousarray(array)
    flag = FLAGS[array.dtype] if flag is None else flag
    if layout == "v2":
        head = struct.pack("<Ii", 0xF993FAC9, stype) + struct.pack("<i", array.ndim)
        head += struct.pack(f"<{array.ndim}q", *array.shape)
    elif layout == "v1":
        head = struct.pack("<I", 0xF993FAC8) + struct.pack("<i", array.ndim)
        head += struct.pack(f"<{array.ndim}q", *array.shape)
    else:  # legacy: ndim in place of the magic, uint32 dims
        head = struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    context = struct.pack("<ii", dev_type, dev_id)
    return head + context + struct.pack("<i", flag) + array.astype(array.dtype.newbyteorder("<"),
                                                                   copy=False).tobytes()


def write_ndarray_list(path, named, records=None, names=None):
    """An ``mxnet.nd.save`` file: list magic, reserved, arrays, names (uint64 lengths)."""
    records = records if records is not None else [ndarray_record(a) for a in named.values()]
    names = list(named) if names is None else names
    with open(path, "wb") as f:
        f.write(struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", len(records)))
        f.writelines(records)
        f.write(struct.pack("<Q", len(names)))
        for name in names:
            data = name.encode()
            f.write(struct.pack("<Q", len(data)) + data)
    return path


def test_writer_follows_the_specification_byte_for_byte(tmp_path):
    """The test writer itself, against bytes spelled out field by field."""
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = write_ndarray_list(tmp_path / "one.params", {"arg:x": a},
                              records=[ndarray_record(a, dev_type=2, dev_id=1)])
    expected = (b"\x12\x01\x00\x00\x00\x00\x00\x00" + b"\x00" * 8  # uint64 0x112, reserved
                + b"\x01" + b"\x00" * 7  # uint64: one array
                + b"\xc9\xfa\x93\xf9" + b"\x00" * 4  # V2 magic, int32 stype 0 (dense)
                + b"\x02\x00\x00\x00"  # ndim
                + b"\x02" + b"\x00" * 7 + b"\x03" + b"\x00" * 7  # int64 dims
                + b"\x02\x00\x00\x00\x01\x00\x00\x00"  # context: gpu, device 1
                + b"\x02\x00\x00\x00"  # dtype flag 2: float16
                + a.tobytes()
                + b"\x01" + b"\x00" * 7 + b"\x05" + b"\x00" * 7 + b"arg:x")
    assert path.read_bytes() == expected
    loaded = mxnet_params.load_ndarray_list(str(path))
    assert list(loaded) == ["arg:x"] and loaded["arg:x"].dtype == np.float16
    np.testing.assert_array_equal(loaded["arg:x"], a)


@pytest.mark.parametrize("layout", ["v2", "v1", "legacy"])
def test_round_trip_of_dtypes_shapes_and_contexts(tmp_path, layout):
    rng = np.random.default_rng(0)
    named = {
        "arg:conv_weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "aux:bn_moving_var": rng.random(5),
        "arg:half": rng.normal(size=(2, 7)).astype(np.float16),
        "arg:bytes": rng.integers(0, 255, size=(3, 1, 2), dtype=np.uint8),
        "arg:ints": rng.integers(-9, 9, size=(6,), dtype=np.int32),
        "arg:small": rng.integers(-9, 9, size=(2, 2), dtype=np.int8),
        "arg:long": np.array([2**40, -3], np.int64),
        "arg:mask": np.array([[True, False, True]]),
        "arg:big_dim": np.zeros((70000, 1), np.uint8),  # > uint16 per dim
    }
    contexts = [(1, 0), (2, 3), (3, 0), (5, 0), (2, 0), (1, 0), (2, 7), (1, 0), (1, 0)]
    records = [ndarray_record(a, layout, *ctx) for a, ctx in zip(named.values(), contexts)]
    path = write_ndarray_list(tmp_path / f"{layout}.params", named, records)
    assert mxnet_params.is_ndarray_list(str(path))
    loaded = mxnet_params.load_ndarray_list(str(path))
    assert list(loaded) == list(named)
    for name, array in named.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array)


@pytest.mark.parametrize("case, match", [
    ("truncated", "cut short"),
    ("sparse", "storage type 1"),
    ("dtype", "dtype flag 12"),
    ("context", "dev_type 9"),
    ("unnamed", "1 arrays but 0 names"),
])
def test_broken_lists_are_refused_with_the_file_named(tmp_path, case, match):
    a = np.ones((2, 2), np.float32)
    records = {"truncated": [ndarray_record(a)[:-3]], "sparse": [ndarray_record(a, stype=1)],
               "dtype": [ndarray_record(a, flag=12)],
               "context": [ndarray_record(a, dev_type=9)]}.get(case, [ndarray_record(a)])
    path = tmp_path / f"{case}.params"
    if case == "truncated":
        path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + records[0])
    else:
        write_ndarray_list(path, {"arg:a": a}, records, [] if case == "unnamed" else None)
    with pytest.raises(ValueError, match=match) as err:
        mxnet_params.load_ndarray_list(str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"\x93NUMPY\x01\x00", b"hello, not weights\n", b""])
def test_convert_refuses_other_formats_naming_file_and_formats(tmp_path, content):
    src = tmp_path / "weights.bin"
    src.write_bytes(content)
    with pytest.raises(ValueError) as err:
        weight_conversion.convert("resnet38", str(src), str(tmp_path / "out"))
    message = str(err.value)
    assert str(src) in message
    assert "PyTorch state dict (.pth" in message and "MXNet NDArray list (.params" in message


def test_mxnet_list_for_an_architecture_without_mxnet_names_is_refused(tmp_path):
    src = write_ndarray_list(tmp_path / "r101.params", {"arg:conv1_weight": np.ones((1,))})
    with pytest.raises(ValueError, match="MXNet names are only known for --arch=resnet38"):
        weight_conversion.convert("resnet101", str(src), str(tmp_path / "out"))


@pytest.mark.parametrize("mx_name, torch_name", [
    ("arg:conv1a_weight", "conv1a.weight"),
    ("arg:res2a_branch1_weight", "b2.conv_branch1.weight"),
    ("arg:res2b1_branch2a_weight", "b2_1.conv_branch2a.weight"),
    ("arg:res4b5_branch2b1_weight", "b4_5.conv_branch2b1.weight"),
    ("arg:res7a_branch2b2_weight", "b7.conv_branch2b2.weight"),
    ("arg:bn3b2_branch2a_gamma", "b3_2.bn_branch2a.weight"),
    ("arg:bn5a_branch2b1_beta", "b5.bn_branch2b1.bias"),
    ("aux:bn6a_branch2b2_moving_mean", "b6.bn_branch2b2.running_mean"),
    ("aux:bn2b2_branch2a_moving_var", "b2_2.bn_branch2a.running_var"),
    ("arg:bn7_gamma", "bn7.weight"), ("arg:bn7_beta", "bn7.bias"),
    ("aux:bn7_moving_mean", "bn7.running_mean"), ("aux:bn7_moving_var", "bn7.running_var"),
    # the ImageNet head (SEAM drops it) and foreign names: kept, so the converter lists them
    ("arg:linear1000_weight", "arg:linear1000_weight"), ("arg:fc9_weight", "arg:fc9_weight"),
])
def test_seam_names(mx_name, torch_name):
    assert mxnet_params.resnet38_torch_name(mx_name) == torch_name


def mxnet_name(torch_name):
    """SEAM's mapping inverted: the name the ImageNet .params file gives a PyTorch key."""
    bn_leaf = {"weight": ("arg", "gamma"), "bias": ("arg", "beta"),
               "running_mean": ("aux", "moving_mean"), "running_var": ("aux", "moving_var")}
    if torch_name == "conv1a.weight":
        return "arg:conv1a_weight"
    module, *rest = torch_name.split(".")
    if module == "bn7":
        prefix, leaf = bn_leaf[rest[0]]
        return f"{prefix}:bn7_{leaf}"
    stage, _, index = module[1:].partition("_")
    block = f"{stage}{'b' + index if index else 'a'}"
    layer, leaf = rest
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{block}_{branch}_weight"
    prefix, mx_leaf = bn_leaf[leaf]
    return f"{prefix}:bn{block}_{branch}_{mx_leaf}"


def random_resnet38_state(backbone, seed=0):
    """Random PyTorch-layout weights for every leaf of ``backbone`` (He-scaled convs, BN
    statistics and affine parameters away from the identity, so a wrong mapping shows)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, var in pretrained.flat_weights(backbone).items():
        shape = weight_conversion.torch_layout(key, var.shape)
        if len(shape) == 4:
            a = rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith((".var", ".scale")):
            a = rng.random(shape, np.float32) + 0.5
        else:
            a = rng.standard_normal(shape, np.float32) * 0.1
        state[weight_conversion.torch_key(key)] = a.astype(np.float32)
    return state


def write_seam_params(path, state, seed=0):
    """``state`` as the ImageNet file names it, with its linear1000 head, in shuffled order."""
    named = {mxnet_name(k): v for k, v in state.items()}
    named["arg:linear1000_weight"] = np.ones((10, state["bn7.weight"].shape[0]), np.float32)
    named["arg:linear1000_bias"] = np.zeros((10,), np.float32)
    order = np.random.default_rng(seed).permutation(len(named))
    names = list(named)
    return write_ndarray_list(path, {names[i]: named[names[i]] for i in order})


def test_small_resnet38_converts_without_torch_or_mxnet(tmp_path, monkeypatch):
    """The CLI on a slim ResNet38-d .params with torch and mxnet unimportable: every weight
    lands where the .pth route would put it, the ImageNet head is listed as ignored."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "mxnet", None)
    make = lambda: models.ResNet38(width_div=16, blocks=(1, 2, 1, 1),  # noqa: E731
                                   rngs=models.init_rngs(0))
    state = random_resnet38_state(nnx.eval_shape(make))
    src = write_seam_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", state)
    out = tmp_path / "ckpt"
    convert.main(["--arch=resnet38", f"--src={src}", f"--out={out}"])
    meta = pretrained.read_meta(str(out))
    assert meta["ignored_keys"] == ["arg:linear1000_bias", "arg:linear1000_weight"]
    backbone = models.load_pretrained(make(), str(out), arch="resnet38")
    for key, var in pretrained.flat_weights(backbone).items():
        np.testing.assert_array_equal(
            np.asarray(var[...]), weight_conversion.from_torch_layout(state[weight_conversion.torch_key(key)]))


def zeros_like_model(abstract):
    """A shape-only module made concrete with zeros (RNG keys: key 0), for ``load_pretrained``
    to fill; initialising the full network eagerly costs 15 s of CPU."""
    def value(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0, impl="rbg")
        return jnp.zeros(x.shape, x.dtype)

    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.from_flat_state([
        (path, var.replace(value(var.get_value()))) for path, var in nnx.to_flat_state(state)]))


def test_full_size_resnet38_params_equal_the_pth_route(tmp_path):
    """The full ResNet38-d (105M parameters) written as SEAM's ImageNet .params and as a .pth:
    both conversions hold the same arrays bit for bit, the features of the backbone loaded
    from either are identical, and they match the PyTorch oracle (1e-4 relative)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # bench/: not installed
    from bench.classifier_torch import TorchResNet38  # noqa: PLC0415

    backbone = nnx.eval_shape(lambda: models.ResNet38(rngs=models.init_rngs(1)))
    state = random_resnet38_state(backbone)
    pth, params = tmp_path / "resnet38d.pth", tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    write_seam_params(params, state)
    convert.main(["--arch=resnet38", f"--src={params}", f"--out={tmp_path / 'from_params'}"])
    convert.main(["--arch=resnet38", f"--src={pth}", f"--out={tmp_path / 'from_pth'}"])
    for src in (pth, params):
        src.unlink()

    x = np.random.default_rng(0).normal(size=(1, 3, 40, 32)).astype(np.float32)
    backbone = zeros_like_model(backbone)
    backbone.eval()
    forward = nnx.jit(lambda m, x: m(x))
    feats, weights = {}, {}
    for route in ("from_params", "from_pth"):
        models.load_pretrained(backbone, str(tmp_path / route), arch="resnet38")
        feats[route] = [np.asarray(f) for f in
                        forward(backbone, jnp.asarray(np.transpose(x, (0, 2, 3, 1))))]
        for key, var in pretrained.flat_weights(backbone).items():
            if route == "from_params":
                weights[key] = np.array(var[...])
            else:
                np.testing.assert_array_equal(np.asarray(var[...]), weights.pop(key), key)
    assert not weights
    for a, b in zip(feats["from_params"], feats["from_pth"]):
        np.testing.assert_array_equal(a, b)
    del backbone

    oracle = TorchResNet38()
    oracle.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        t_feats, _ = oracle.eval()(torch.from_numpy(x))
    assert len(t_feats) == len(feats["from_params"]) == 6
    for f, t in zip(feats["from_params"], t_feats):
        t = np.transpose(t.numpy(), (0, 2, 3, 1))
        assert f.shape == t.shape
        assert np.max(np.abs(f - t)) / np.max(np.abs(t)) < 1e-4


def test_an_array_larger_than_the_file_is_refused_before_allocating(tmp_path):
    """A damaged list claiming a 200000x200000 array: refused naming the file (no 160 GB
    allocation, no bare MemoryError)."""
    record = struct.pack("<Iiiqq", 0xF993FAC9, 0, 2, 200000, 200000) + struct.pack("<iii", 1, 0, 0)
    path = tmp_path / "huge.params"
    path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + record + b"\0" * 64)
    with pytest.raises(ValueError, match=r"cut short or damaged \(wanted 160000000000 bytes"):
        mxnet_params.load_ndarray_list(str(path))


@pytest.mark.parametrize("content", ["truncated", "random", "huge"])
def test_the_convert_command_prints_one_paragraph_for_a_bad_file(tmp_path, capsys, content):
    a = np.ones((4, 4), np.float32)
    path = tmp_path / "w.params"
    if content == "truncated":
        path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + ndarray_record(a)[:-5])
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        record = struct.pack("<Iiiqq", 0xF993FAC9, 0, 2, 200000, 200000) + struct.pack("<iii", 1, 0, 0)
        path.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + record)
    status = convert.main(["--arch=resnet38", f"--src={path}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
