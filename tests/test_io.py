"""Tests of pmm_jax.io: atomic writes, palette PNG masks and the official CAM format."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pmm_jax import io
from pmm_jax.constants import PALETTE


def test_mask_round_trip_is_a_palette_png(tmp_path):
    mask = np.array([[0, 1, 2], [20, 255, 3]], np.uint8)
    path = str(tmp_path / "sub" / "a.png")
    io.write_mask(path, mask)
    np.testing.assert_array_equal(io.read_mask(path), mask)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[3:6] == list(PALETTE[1])


def test_write_mask_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        io.write_mask(str(tmp_path / "a.png"), np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="0..255"):
        io.write_mask(str(tmp_path / "a.png"), np.full((2, 2), 300))
    assert os.listdir(tmp_path) == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_cams_official_format(tmp_path):
    """Files are a pickled {class: float16 map} dict loadable like the official code does."""
    cams = {0: np.random.rand(4, 5), 14: np.random.rand(4, 5)}
    path = str(tmp_path / "x.npy")
    io.write_cams(path, cams)
    official = np.load(path, allow_pickle=True).item()
    assert sorted(official) == [0, 14] and official[14].dtype == np.float16
    read = io.read_cams(path)
    np.testing.assert_allclose(read[14], cams[14], atol=1e-3)


def test_read_cams_accepts_npz_and_reports_bad_files(tmp_path):
    np.savez(tmp_path / "a.npz", cams=np.ones((2, 3, 3)), classes=np.array([4, 7]))
    assert sorted(io.read_cams(str(tmp_path / "a.npz"))) == [4, 7]
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        io.read_cams(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "arr.npy", np.ones(3))
    with pytest.raises(ValueError, match="pickled dict"):
        io.read_cams(str(tmp_path / "arr.npy"))


def test_read_image_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="broken.jpg"):
        io.read_image(str(tmp_path / "broken.jpg"))


def test_json_round_trip(tmp_path):
    io.write_json(str(tmp_path / "r.json"), {"b": 1, "a": [0.5]})
    assert io.read_json(str(tmp_path / "r.json")) == {"a": [0.5], "b": 1}
