"""pmm_jax.cams.multicrop_tiling against a direct transcription of the official tiling loops (written here
from the reference semantics), on many image sizes and scales."""

import itertools
import math

import numpy as np
import pytest

from pmm_jax.cams import multicrop_tiling


def reference_boxes(width, height, s, crop=448, stride=300):
    """The official double loop, transcribed: x-major, last tile flush with the border."""
    out = []
    w, h = int(width * s), int(height * s)
    w_num = 1 + int(math.ceil(max(0.0, float(w - crop)) / stride))
    h_num = 1 + int(math.ceil(max(0.0, float(h - crop)) / stride))
    for wi in range(w_num):
        for hi in range(h_num):
            if wi == w_num - 1:
                x2 = w
                x1 = max(0, x2 - crop)
            else:
                x2 = min(w, (wi + 1) * stride)
                x1 = wi * stride
            if hi == h_num - 1:
                y2 = h
                y1 = max(0, y2 - crop)
            else:
                y2 = min(h, (hi + 1) * stride)
                y1 = hi * stride
            out.append((int(float(x1) / s), int(float(y1) / s), int(float(x2) / s),
                        int(float(y2) / s)))
    return out


def reference_label(heat, param, num_classes, thresh=0.1):
    selected = np.zeros_like(next(iter(heat.values())))
    selected[int(param[1]):int(param[3]), int(param[0]):int(param[2])] = 1
    new = np.zeros(num_classes, np.float32)
    for i in range(num_classes):
        if i + 1 not in heat:
            continue
        mask = heat[i + 1]
        if (mask > 0.9).sum() == 0:
            continue
        inter = float(((mask > 0.9) * selected).sum())
        if inter / (mask > 0.9).sum() > thresh or inter / selected.sum() > thresh:
            new[i] = 1
    return new


def test_scales_are_the_papers():
    assert multicrop_tiling.SCALES == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)


@pytest.mark.parametrize("size", [(500, 375), (333, 500), (100, 80), (448, 448), (449, 301)])
def test_tile_boxes_match_the_official_loops(size):
    for s in multicrop_tiling.SCALES:
        assert multicrop_tiling.tile_boxes(*size, s) == reference_boxes(*size, s)
    assert multicrop_tiling.tile_boxes(100, 80, 0.75) == [(0, 0, 100, 80)]  # small: one tile


def test_crop_labels_match_the_official_rule():
    rng = np.random.default_rng(0)
    h, w, c = 60, 80, 6
    heat = {k + 1: rng.random((h, w)) ** 3 for k in (0, 2, 5)}
    heat[3] = np.zeros((h, w))  # a class whose mask never passes 0.9
    masks = {k - 1: v for k, v in heat.items()}
    for _ in range(50):
        x1, y1 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        box = (x1, y1, int(rng.integers(x1 + 1, w + 1)), int(rng.integers(y1 + 1, h + 1)))
        np.testing.assert_array_equal(multicrop_tiling.crop_labels(masks, box, c),
                                      reference_label(heat, box, c))


def test_sample_training_crop_prefers_a_labelled_tile():
    masks = {1: np.zeros((900, 1200))}
    masks[1][800:, 1100:] = 1.0  # only the bottom-right corner has the object
    box, labels = multicrop_tiling.sample_training_crop(masks, 1200, 900, 3,
                                                 np.random.default_rng(0), scales=(1.0,))
    assert labels.tolist() == [0.0, 1.0, 0.0]
    assert box[2] == 1200 and box[3] == 900
    box, labels = multicrop_tiling.sample_training_crop({}, 1200, 900, 3, np.random.default_rng(0))
    assert labels.sum() == 0  # no rough mask: the last tile tried, all-zero label


def test_accumulate_averages_over_covering_tiles_and_masks_labels():
    boxes = [(0, 0, 6, 4), (3, 0, 8, 4)]
    cams = [np.ones((2, 4, 6)), 3 * np.ones((2, 4, 5))]
    out = multicrop_tiling.accumulate(cams, boxes, np.array([1.0, 0.0]), 5, 8)
    assert out.shape == (2, 5, 8)
    np.testing.assert_allclose(out[0, 0], [1, 1, 1, 2, 2, 2, 3, 3])
    assert np.all(out[0, 4] == 0) and np.all(out[1] == 0)


# Rough masks (the training crops' labels) and the tf.data multi-crop training batches.

def test_read_rough_masks_png_and_official_npy(tmp_path):
    from pmm_jax.files import safe_io

    labels = np.full((6, 8), 255, np.uint8)
    labels[:2] = 0
    labels[3:, :4] = 2  # class 1
    labels[3:, 6:] = 4  # class 3
    safe_io.write_mask(str(tmp_path / "a.png"), labels)
    masks = multicrop_tiling.read_rough_masks(str(tmp_path / "a.png"), 4)
    assert sorted(masks) == [1, 3] and masks[1].sum() == 12 and masks[3].sum() == 6
    # Official npy: {0: background, c+1: probability of class c}, thresholded at 0.9.
    heat = {0: np.full((6, 8), 0.95), 2: np.where(labels == 2, 0.95, 0.5),
            3: np.full((6, 8), 0.9)}
    np.save(tmp_path / "b.npy", heat, allow_pickle=True)
    masks = multicrop_tiling.read_rough_masks(str(tmp_path / "b.npy"), 4)
    assert sorted(masks) == [1, 2] and masks[1].sum() == 12 and masks[2].sum() == 0
    np.save(tmp_path / "c.npy", {5: np.ones((6, 8))}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"c\.npy: class key 5 is outside 0\.\.4"):
        multicrop_tiling.read_rough_masks(str(tmp_path / "c.npy"), 4)
    safe_io.write_mask(str(tmp_path / "d.png"), np.full((6, 8), 7, np.uint8))
    with pytest.raises(ValueError, match=r"d\.png: rough-mask values \[7\]"):
        multicrop_tiling.read_rough_masks(str(tmp_path / "d.png"), 4)


def test_hostile_rough_mask_npy_is_refused_and_runs_nothing(tmp_path):
    from tests.support.hostile_files import hostile_npy

    path = hostile_npy(tmp_path / "evil.npy", tmp_path / "pwned", "subprocess")
    with pytest.raises(ValueError, match=r"evil\.npy: .*refused to unpickle subprocess\.call"):
        multicrop_tiling.read_rough_masks(path, 4)
    assert not (tmp_path / "pwned").exists()
    np.save(tmp_path / "keys.npy", {0: np.ones((2, 2)), "2": np.ones((2, 2))}, allow_pickle=True)
    with pytest.raises(ValueError, match=r"keys\.npy: key '2' \(str\) is not an integer"):
        multicrop_tiling.read_rough_masks(str(tmp_path / "keys.npy"), 4)


def test_rough_mask_paths_name_the_missing_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.npy").write_bytes(b"")
    assert multicrop_tiling.rough_mask_paths(str(tmp_path), ["a", "b"]) == {
        "a": str(tmp_path / "a.png"), "b": str(tmp_path / "b.npy")}
    with pytest.raises(FileNotFoundError, match=r"1 of 3 training images .*c\.png"):
        multicrop_tiling.rough_mask_paths(str(tmp_path), ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        multicrop_tiling.rough_mask_paths(str(tmp_path / "nope"), ["a"])


def toy_dataset():
    """Two tfds-style examples: 'a' (60x80, black but for a white bottom-right corner, the
    rough mask of class 1) and 'b' (40x40, class 0 and 2 in its image label)."""
    import tensorflow as tf

    a = np.zeros((60, 80, 3), np.uint8)
    a[40:, 60:] = 255
    examples = [("a", a, [1.0, 1.0, 0.0]), ("b", np.full((40, 40, 3), 128, np.uint8),
                                             [1.0, 0.0, 1.0])]

    def gen():
        for image_id, image, labels in examples:
            yield {"id": image_id, "image": image, "labels": np.float32(labels),
                   "mask": np.zeros(image.shape[:2] + (1,), np.uint8)}

    return tf.data.Dataset.from_generator(gen, output_signature={
        "id": tf.TensorSpec((), tf.string), "image": tf.TensorSpec((None, None, 3), tf.uint8),
        "labels": tf.TensorSpec((3,), tf.float32),
        "mask": tf.TensorSpec((None, None, 1), tf.uint8)})


def write_toy_rough_masks(directory):
    from pmm_jax.files import safe_io

    corner = np.zeros((60, 80), np.uint8)
    corner[40:, 60:] = 2
    safe_io.write_mask(str(directory / "a.png"), corner)
    b = np.zeros((40, 40), np.uint8)
    b[:, :20] = 1  # class 0
    b[:, 20:] = 2  # class 1: not in b's image label, so never a crop label
    safe_io.write_mask(str(directory / "b.png"), b)


def test_multicrop_train_batches(tmp_path):
    from pmm_jax.data import multicrop_batches

    write_toy_rough_masks(tmp_path)
    kwargs = dict(rough_masks=str(tmp_path), batch_size=4, crop_size=16, seed=3,
                  num_foreground=3, scales=(1.0, 2.0), tile=32, stride=20, shuffle_buffer=2)
    batches = multicrop_batches.multicrop_train_batches(toy_dataset(), **kwargs)
    seen = {"a": 0, "b": 0}
    for _ in range(6):
        batch = next(batches)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["mask"].shape == (4, 16, 16) and batch["labels"].shape == (4, 3)
        for image_id, image, labels in zip(batch["id"], batch["image"], batch["labels"]):
            image_id = image_id.decode()
            seen[image_id] += 1
            if image_id == "a":
                assert labels.tolist() in ([0, 1, 0], [0, 0, 0])
                if labels[1]:  # a tile labelled by the corner's rough mask shows the corner
                    assert image.max() > 1.5
            else:
                assert labels.tolist() in ([1, 0, 0], [0, 0, 0])
    assert seen["a"] and seen["b"]
    resumed = multicrop_batches.multicrop_train_batches(toy_dataset(), **kwargs, start_step=3)
    for expected in itertools.islice(multicrop_batches.multicrop_train_batches(toy_dataset(), **kwargs),
                                     3, 6):  # resumed at step 3: exactly the rest of the stream
        got = next(resumed)
        for key in ("image", "mask", "labels", "id"):
            np.testing.assert_array_equal(got[key], expected[key])


def test_multicrop_train_batches_name_missing_and_mismatched_rough_masks(tmp_path):
    import tensorflow as tf

    from pmm_jax.data import multicrop_batches
    from pmm_jax.files import safe_io

    write_toy_rough_masks(tmp_path)
    (tmp_path / "b.png").unlink()
    kwargs = dict(rough_masks=str(tmp_path), batch_size=2, crop_size=16, seed=0,
                  num_foreground=3, scales=(1.0,), tile=32, stride=20)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 training images .*b\.png"):
        multicrop_batches.multicrop_train_batches(toy_dataset(), **kwargs)
    safe_io.write_mask(str(tmp_path / "b.png"), np.ones((40, 41), np.uint8))
    with pytest.raises(tf.errors.OpError, match=r"b\.png: rough mask is 40x41 but its image is "
                                                r"40x40"):
        next(multicrop_batches.multicrop_train_batches(toy_dataset(), **kwargs))
