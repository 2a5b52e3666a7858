"""The synthetic_wsss dataset: renderer properties and the offline tfds builder."""

import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import gcs_utils

from pmm_jax.constants import IGNORE_LABEL, SYNTHETIC_CLASSES
from pmm_jax.data import synthetic
from pmm_jax.data.builder_base import labels_from_mask, prepare
from pmm_jax.data.synthetic import NUM_CLASSES, render_sample
from tests.support.concurrency import overlap_recorder, run_concurrently

SIZE = 48
NUM_SAMPLES = 150


@pytest.fixture(scope="module")
def samples():
    return [render_sample(np.random.default_rng((7, index)), SIZE) for index in range(NUM_SAMPLES)]


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(scope="module")
def offline_tiny(tmp_path_factory):
    """``tiny`` prepared into a fresh data_dir with sockets and every GCS access refused."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tf.zeros(())  # start TensorFlow's runtime now, so the timing below is generation only
    with pytest.MonkeyPatch.context() as patch:
        for name in ("connect", "connect_ex"):
            patch.setattr(socket.socket, name, _refuse)
        patch.setattr(socket, "getaddrinfo", _refuse)
        patch.setattr(gcs_utils, "exists", _refuse)
        patch.setattr(gcs_utils, "download_gcs_folder", _refuse)
        start = time.perf_counter()
        builder = prepare("synthetic_wsss/tiny", data_dir)
        seconds = time.perf_counter() - start
        again = prepare("synthetic_wsss/tiny", data_dir)
    return builder, again, seconds


def test_num_classes_matches_constants():
    assert NUM_CLASSES == len(SYNTHETIC_CLASSES) - 1 == 5


def test_render_is_deterministic_from_seed():
    a_image, a_mask = render_sample(np.random.default_rng(3), SIZE)
    b_image, b_mask = render_sample(np.random.default_rng(3), SIZE)
    c_image, _ = render_sample(np.random.default_rng(4), SIZE)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_image, c_image)


def test_render_shapes_and_values(samples):
    for image, mask in samples:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= set(range(NUM_CLASSES + 1)) | {IGNORE_LABEL}


def test_every_image_has_an_object_and_a_boundary(samples):
    for _, mask in samples:
        assert 1 <= labels_from_mask(mask, NUM_CLASSES).sum() <= 3
        assert (mask == IGNORE_LABEL).any()


def test_boundary_separates_labels_and_is_thin(samples):
    band_pixels = isolated = 0
    for _, mask in samples:
        labelled = mask != IGNORE_LABEL
        # No two 4-neighbours with different labels touch: the 255 band lies between them.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            both = (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
            assert np.all(a[both] == b[both])
        # 1 px wide: band pixels have a labelled 4-neighbour, except where slivers meet.
        padded = np.pad(labelled, 1)
        beside_label = np.zeros_like(labelled)
        for dy, dx in ((0, 1), (1, 0), (1, 2), (2, 1)):
            beside_label |= padded[dy:dy + SIZE, dx:dx + SIZE]
        band_pixels += (~labelled).sum()
        isolated += (~labelled & ~beside_label).sum()
    assert isolated / band_pixels < 0.005


def test_classes_co_occur_and_touch(samples):
    labels = np.stack([labels_from_mask(mask, NUM_CLASSES) for _, mask in samples])
    multi = labels.sum(axis=1) >= 2
    assert multi.mean() > 0.4
    co_occurrence = labels.T @ labels
    np.fill_diagonal(co_occurrence, 0)
    # ring (0) and kite (1) are partners: they co-occur more than ring with comet (2).
    assert co_occurrence[0, 1] > co_occurrence[0, 2]
    touching = 0
    for (_, mask), present in zip(samples, labels):
        classes = np.flatnonzero(present) + 1
        # Touching objects are 2 px apart across the boundary band: grow each by 2 px.
        grown = [np.pad(mask == c, 2) for c in classes]
        grown = [np.any([g[dy:dy + SIZE, dx:dx + SIZE] for dy in range(5) for dx in range(5)], 0)
                 for g in grown]
        touching += any((grown[i] & (mask == classes[j])).any()
                        for i in range(len(classes)) for j in range(len(classes)) if i != j)
    assert touching / multi.sum() > 0.3


def test_parts_are_small_and_inside_the_object():
    yy, xx = np.mgrid[-1.5:1.5:300j, -1.5:1.5:300j]
    for shape in synthetic._SHAPES:
        body, part = shape(xx, yy, np.random.default_rng(0))
        assert np.all(body[part])
        assert 0.04 < part.sum() / body.sum() < 0.15


def test_all_classes_appear(samples):
    labels = np.stack([labels_from_mask(mask, NUM_CLASSES) for _, mask in samples])
    assert np.all(labels.mean(axis=0) > 0.15)


def test_builder_offline_fast_and_reused(offline_tiny):
    builder, again, seconds = offline_tiny
    assert seconds < 20.0, f"building tiny took {seconds:.1f} s"
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["val"].num_examples == 32
    assert again.data_dir == builder.data_dir
    assert gcs_utils._is_gcs_disabled


def test_builder_examples(offline_tiny):
    builder, _, _ = offline_tiny
    examples = list(tfds.as_numpy(builder.as_dataset(split="val", shuffle_files=False)))
    assert [e["id"].decode() for e in examples] == [f"val_{i:06d}" for i in range(32)]
    for index, example in enumerate(examples[:4]):
        assert example["image"].shape == (SIZE, SIZE, 3) and example["image"].dtype == np.uint8
        assert example["mask"].shape == (SIZE, SIZE, 1) and example["mask"].dtype == np.uint8
        assert example["labels"].shape == (NUM_CLASSES,) and example["labels"].dtype == np.float32
        image, mask = render_sample(np.random.default_rng((0, 1, index)), SIZE)
        np.testing.assert_array_equal(example["image"], image)
        np.testing.assert_array_equal(example["mask"][:, :, 0], mask)
    for example in examples:
        np.testing.assert_array_equal(example["labels"], labels_from_mask(example["mask"], NUM_CLASSES))


def test_two_runs_sharing_a_data_dir_prepare_it_once(tmp_path, monkeypatch):
    state = overlap_recorder(monkeypatch, synthetic.SyntheticWsss)
    errors = run_concurrently(lambda: prepare("synthetic_wsss/tiny", str(tmp_path)))
    assert errors == [] and state["most"] == 1
    assert tfds.builder("synthetic_wsss/tiny", data_dir=str(tmp_path)).is_prepared()
