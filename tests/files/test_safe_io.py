"""Tests of pmm_jax.files.safe_io: atomic writes, palette PNG masks and the official CAM format."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pmm_jax.constants import PALETTE
from pmm_jax.files import safe_io
from tests.support.hostile_files import hostile_npy


def test_mask_round_trip_is_a_palette_png(tmp_path):
    mask = np.array([[0, 1, 2], [20, 255, 3]], np.uint8)
    path = str(tmp_path / "sub" / "a.png")
    safe_io.write_mask(path, mask)
    np.testing.assert_array_equal(safe_io.read_mask(path), mask)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[3:6] == list(PALETTE[1])


def test_write_mask_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        safe_io.write_mask(str(tmp_path / "a.png"), np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="0..255"):
        safe_io.write_mask(str(tmp_path / "a.png"), np.full((2, 2), 300))
    assert os.listdir(tmp_path) == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with safe_io.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_stale_temps_of_a_killed_process_are_removed_and_live_ones_kept(tmp_path):
    """A ``.tmp-`` file older than this process was left by a killed writer and goes; one
    created since (another process of this run, mid-write) and the outputs stay."""
    stale, live, output = (tmp_path / ".tmp-a.png", tmp_path / ".tmp-b.png", tmp_path / "c.png")
    for path in (stale, live, output):
        path.write_bytes(b"x")
    past = safe_io._PROCESS_START - 60
    os.utime(stale, (past, past))
    os.utime(output, (past, past))
    assert safe_io.remove_stale_temps(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == [".tmp-b.png", "c.png"]
    assert safe_io.remove_stale_temps(str(tmp_path / "missing")) == 0


def test_cams_official_format(tmp_path):
    """Files are a pickled {class: float16 map} dict loadable like the official code does."""
    cams = {0: np.random.rand(4, 5), 14: np.random.rand(4, 5)}
    path = str(tmp_path / "x.npy")
    safe_io.write_cams(path, cams)
    official = np.load(path, allow_pickle=True).item()
    assert sorted(official) == [0, 14] and official[14].dtype == np.float16
    read = safe_io.read_cams(path)
    np.testing.assert_allclose(read[14], cams[14], atol=1e-3)


def test_read_cams_accepts_npz_and_reports_bad_files(tmp_path):
    np.savez(tmp_path / "a.npz", cams=np.ones((2, 3, 3)), classes=np.array([4, 7]))
    assert sorted(safe_io.read_cams(str(tmp_path / "a.npz"))) == [4, 7]
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        safe_io.read_cams(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "arr.npy", np.ones(3))
    with pytest.raises(ValueError, match="pickled dict"):
        safe_io.read_cams(str(tmp_path / "arr.npy"))


def test_read_image_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="broken.jpg"):
        safe_io.read_image(str(tmp_path / "broken.jpg"))


def test_json_round_trip(tmp_path):
    safe_io.write_json(str(tmp_path / "r.json"), {"b": 1, "a": [0.5]})
    assert safe_io.read_json(str(tmp_path / "r.json")) == {"a": [0.5], "b": 1}


def test_json_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A power loss must never leave an empty marker: the temp file is fsync'd before the
    rename (and the folder after it)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.basename(
        os.readlink(f"/proc/self/fd/{fd}")))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(
        str(b)))), real_replace(a, b))[1])
    safe_io.write_json(str(tmp_path / "marker.json"), {"id": "x"})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(safe_io.TEMP_PREFIX) and events[2][1] == tmp_path.name


# ------------------------------------------------------------------------------------------
# Hostile and malformed CAM files: nothing in a data file may run code.


@pytest.mark.parametrize("how", ["exec", "system", "subprocess", "empty"])
def test_hostile_cam_file_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    path = hostile_npy(tmp_path / "evil.npy", marker, how)
    # The payload is live: numpy's own pickle loader runs it.
    np.load(path, allow_pickle=True)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"evil\.npy: .*refused to unpickle"):
        safe_io.read_cams(path)
    assert not marker.exists()


def _numpy1_npy(path, obj):
    """``path`` as numpy 1.x's ``np.save`` wrote it: pickle protocol 3 naming
    ``numpy.core.multiarray`` (numpy 2 writes protocol 4 and ``numpy._core``)."""
    array = np.empty((), dtype=object)
    array[()] = obj
    data = pickle.dumps(array, protocol=3).replace(b"numpy._core.multiarray\n",
                                                   b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"_core" not in data
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(data)
    return str(path)


def test_official_cam_files_of_numpy_1_and_2_still_load(tmp_path):
    """The official format (np.save of {class: float map}) under both numpy module paths,
    with Python and numpy integer keys, float16/32/64 values; an empty dict is valid."""
    rng = np.random.default_rng(0)
    cams = {0: rng.random((4, 5)).astype(np.float16), np.int64(14): rng.random((4, 5)),
            np.uint8(3): rng.random((4, 5)).astype(np.float32)}
    np.save(tmp_path / "v2.npy", cams, allow_pickle=True)
    for path in (str(tmp_path / "v2.npy"), _numpy1_npy(tmp_path / "v1.npy", cams)):
        read = safe_io.read_cams(path)
        assert sorted(read) == [0, 3, 14] and all(type(k) is int for k in read)
        for key, value in cams.items():
            assert read[int(key)].dtype == np.float32
            np.testing.assert_allclose(read[int(key)], value.astype(np.float32))
    np.save(tmp_path / "empty.npy", {}, allow_pickle=True)
    assert safe_io.read_cams(str(tmp_path / "empty.npy")) == {}


@pytest.mark.parametrize("key", ["7", 2.7, True])
def test_cam_keys_must_be_integers(tmp_path, key):
    path = str(tmp_path / "keys.npy")
    np.save(path, {0: np.ones((2, 2)), key: np.ones((2, 2))}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"keys\.npy: key .* is not an integer class index"):
        safe_io.read_cams(path)


def test_cam_values_must_be_numeric_arrays(tmp_path):
    for name, value in (("list", [[1.0]]), ("objects", np.array([None, 1.0], dtype=object)),
                        ("strings", np.array(["a"]))):
        path = str(tmp_path / f"{name}.npy")
        np.save(path, {0: value}, allow_pickle=True)
        with pytest.raises(ValueError, match=rf"{name}\.npy: the value of key 0 is"):
            safe_io.read_cams(path)


def test_npz_cams_must_match_their_integer_classes(tmp_path):
    cases = {"long": (np.ones((1, 3, 3)), np.array([4, 7])),
             "float": (np.ones((2, 3, 3)), np.array([4.0, 7.5])),
             "repeat": (np.ones((2, 3, 3)), np.array([4, 4])),
             "flat": (np.ones((2, 3)), np.array([4, 7]))}
    for name, (cams, classes) in cases.items():
        np.savez(tmp_path / f"{name}.npz", cams=cams, classes=classes)
        with pytest.raises(ValueError, match=rf"{name}\.npz: '(cams|classes)'"):
            safe_io.read_cams(str(tmp_path / f"{name}.npz"))


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    grey = np.array([[0, 1, 127], [128, 200, 255]], np.uint8)
    path = str(tmp_path / "deep.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
        assert np.asarray(image.convert("RGB"))[0, 1, 0] == 255  # what clipping would give
    np.testing.assert_array_equal(safe_io.read_image(path), np.repeat(grey[:, :, None], 3, axis=2))
    Image.fromarray(np.full((2, 3), 70000, np.int32)).save(tmp_path / "wide.tif")
    Image.fromarray(np.full((2, 3), 0.5, np.float32)).save(tmp_path / "float.tif")
    for name in ("wide.tif", "float.tif"):
        with pytest.raises(ValueError, match=rf"{name}: cannot read image .*no defined 8-bit"):
            safe_io.read_image(str(tmp_path / name))


def test_label_png_must_be_a_lossless_palette_or_greyscale_png(tmp_path):
    labels = np.zeros((16, 16), np.uint8)
    labels[4:12, 4:12] = 3
    Image.fromarray(labels).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(safe_io.read_mask(str(tmp_path / "grey.png")), labels)
    Image.fromarray(labels).save(tmp_path / "jpeg.png", format="JPEG")
    Image.fromarray(PALETTE[labels]).save(tmp_path / "rgb.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "deep.png")
    noisy = str(tmp_path / "noisy.png")
    safe_io.write_mask(noisy, np.random.default_rng(0).integers(0, 21, (16, 16)))
    (tmp_path / "cut.png").write_bytes(open(noisy, "rb").read()[:-40])  # inside the pixel data
    for name, cause in (("jpeg.png", "the file is JPEG"), ("rgb.png", "got mode RGB"),
                        ("deep.png", "got mode I;16"), ("cut.png", "")):
        with pytest.raises(ValueError, match=rf"{name}: .*{cause}"):
            safe_io.read_mask(str(tmp_path / name))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        safe_io.write_bytes(str(tmp_path / "a.bin"), b"x")
        safe_io.write_mask(str(tmp_path / "m.png"), np.zeros((2, 2), np.uint8))
        safe_io.write_json(str(tmp_path / "r.json"), {})
    finally:
        os.umask(before)
    for name in ("a.bin", "m.png", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
