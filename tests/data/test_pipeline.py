"""tf.data pipelines: shards, train batches, padded eval batches and the pseudo-mask join."""

import functools
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pmm_jax.constants import IGNORE_LABEL
from pmm_jax.data import builder_base, mmseg_augment, pipeline
from pmm_jax.constants import IMAGENET_MEAN_UNIT as IMAGENET_MEAN
from pmm_jax.constants import IMAGENET_STD_UNIT as IMAGENET_STD
from pmm_jax.files import safe_io

NAME = "synthetic_wsss/tiny"
SIZE = 48
NUM_TRAIN, NUM_VAL = 64, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    builder_base.prepare(NAME, directory)
    return directory


def _ids(ds):
    return [example["id"].decode() for example in tfds.as_numpy(ds)]


def _valid_ids(batches):
    return [i.decode() for batch in batches for i, ok in zip(batch["id"], batch["valid"]) if ok]


def _denormalize(image):
    return (image * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255.0


def test_counts(data_dir):
    assert pipeline.num_examples(NAME, "train", data_dir) == NUM_TRAIN
    assert pipeline.num_examples(NAME, "val", data_dir) == NUM_VAL
    assert pipeline.rows_per_process(NAME, "val", data_dir, process_count=1) == NUM_VAL
    assert pipeline.rows_per_process(NAME, "val", data_dir, process_count=3) == 11  # 11, 11, 10


@pytest.mark.parametrize("count", [1, 3])
def test_shards_are_disjoint_ordered_and_cover_the_split(data_dir, count):
    shards = [_ids(pipeline.load_split(NAME, "val", data_dir, process_index=i, process_count=count))
              for i in range(count)]
    flat = [image_id for shard in shards for image_id in shard]
    assert flat == [f"val_{i:06d}" for i in range(NUM_VAL)]  # disjoint, complete, in order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_load_split_defaults_to_this_process(data_dir):
    assert _ids(pipeline.load_split(NAME, "val", data_dir)) == _ids(
        pipeline.load_split(NAME, "val", data_dir, process_index=0, process_count=1))
    with pytest.raises(ValueError, match="process_index"):
        pipeline.load_split(NAME, "val", data_dir, process_index=2, process_count=2)


def test_train_batches_static_deterministic_and_epoch_complete(data_dir):
    ds = pipeline.load_split(NAME, "train", data_dir)

    def first(n, seed):
        batches = pipeline.train_batches(ds, batch_size=8, crop_size=40, seed=seed,
                                         num_foreground=5)
        return list(itertools.islice(batches, n))

    batches = first(NUM_TRAIN // 8 + 1, seed=0)
    for batch in batches:
        assert batch["image"].shape == (8, 40, 40, 3) and batch["image"].dtype == np.float32
        assert batch["mask"].shape == (8, 40, 40) and batch["mask"].dtype == np.int32
        assert batch["labels"].shape == (8, 5) and batch["labels"].dtype == np.float32
        assert batch["id"].shape == (8,)
        assert set(batch) == {"image", "mask", "labels", "id"}
    epoch = [i for batch in batches[:NUM_TRAIN // 8] for i in batch["id"]]
    assert len(set(epoch)) == NUM_TRAIN  # one shuffled pass over the shard, then repeat
    assert epoch[:8] != sorted(epoch[:8])
    again = first(2, seed=0)
    other = first(2, seed=1)
    for key in ("image", "mask", "id"):
        np.testing.assert_array_equal(again[1][key], batches[1][key])
    assert not np.array_equal(other[0]["id"], batches[0]["id"])


def test_train_batches_drop_remainder(data_dir):
    ds = pipeline.load_split(NAME, "train", data_dir).take(10)
    batches = pipeline.train_batches(ds, batch_size=4, crop_size=32, seed=0, num_foreground=5)
    assert all(next(batches)["image"].shape[0] == 4 for _ in range(6))


def test_train_batches_checks_label_count(data_dir):
    ds = pipeline.load_split(NAME, "train", data_dir)
    with pytest.raises(ValueError, match="expected 20"):
        pipeline.train_batches(ds, batch_size=4, crop_size=32, seed=0, num_foreground=20)


PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)


def _colour_coded(num, height, width, block=8):
    """Examples whose mask is a function of the pixel colour: mask = index into PALETTE."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, len(PALETTE), size=(num, height // block, width // block))
    masks = blocks.repeat(block, axis=1).repeat(block, axis=2).astype(np.uint8)
    return tf.data.Dataset.from_tensor_slices({
        "id": [f"x_{i}" for i in range(num)],
        "image": PALETTE[masks],
        "mask": masks[..., None],
        "labels": np.zeros((num, 5), np.float32),
    })


@pytest.mark.parametrize("scale_range", [None, (0.7, 1.3)])
def test_augmentation_keeps_image_and_mask_aligned(scale_range):
    ds = _colour_coded(6, 40, 48)
    batches = pipeline.train_batches(ds, batch_size=6, crop_size=44, seed=3, num_foreground=5,
                                     scale_range=scale_range)
    checked = 0
    for batch in itertools.islice(batches, 4):
        rgb = _denormalize(batch["image"])
        mask = batch["mask"]
        padding = np.all(batch["image"] == 0, axis=-1)
        assert np.all(mask[padding] == IGNORE_LABEL)
        labelled = mask != IGNORE_LABEL
        assert np.all(labelled[~padding])
        distance = np.abs(rgb - PALETTE[np.where(labelled, mask, 0)].astype(np.float32)).max(-1)
        matches = distance[labelled] < 1.0
        # Exact except for the bilinear blend along colour edges when the image is rescaled.
        assert matches.mean() > (0.999 if scale_range is None else 0.8)
        checked += labelled.sum()
    assert checked > 0


def test_augmentation_flips_and_crops():
    ds = _colour_coded(1, 40, 48).repeat(8)
    batch = next(pipeline.train_batches(ds, batch_size=8, crop_size=32, seed=0, num_foreground=5,
                                        scale_range=None))
    original = np.asarray(next(iter(ds))["mask"])[:, :, 0]
    flipped = original[:, ::-1]
    kinds = set()
    for crop in batch["mask"]:
        for name, source in (("plain", original), ("flipped", flipped)):
            for top in range(40 - 32 + 1):
                for left in range(48 - 32 + 1):
                    if np.array_equal(source[top:top + 32, left:left + 32], crop):
                        kinds.add(name)
    assert kinds == {"plain", "flipped"}


def test_eval_batches_cover_every_example_once(data_dir):
    ds = pipeline.load_split(NAME, "val", data_dir)
    batches = list(pipeline.eval_batches(ds, batch_size=5))
    assert len(batches) == 7
    for batch in batches:
        assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["raw"].shape == (5, SIZE, SIZE, 3) and batch["raw"].dtype == np.uint8
        assert batch["mask"].shape == (5, SIZE, SIZE) and batch["mask"].dtype == np.int32
        assert batch["valid"].dtype == bool and batch["height"].dtype == np.int32
    assert _valid_ids(batches) == [f"val_{i:06d}" for i in range(NUM_VAL)]
    last = batches[-1]
    np.testing.assert_array_equal(last["valid"], [True, True, False, False, False])
    assert np.all(last["mask"][2:] == IGNORE_LABEL) and np.all(last["id"][2:] == b"")
    assert np.all(last["height"][2:] == 0)
    first = next(iter(tfds.as_numpy(ds)))
    np.testing.assert_array_equal(batches[0]["raw"][0], first["image"])
    np.testing.assert_array_equal(batches[0]["mask"][0], first["mask"][:, :, 0])
    np.testing.assert_allclose(_denormalize(batches[0]["image"][0]), first["image"], atol=1e-3)


def test_eval_batches_pad_to_a_larger_size(data_dir):
    ds = pipeline.load_split(NAME, "val", data_dir).take(3)
    batch = next(pipeline.eval_batches(ds, batch_size=4, pad_to=(56, 60)))
    assert batch["image"].shape == (4, 56, 60, 3)
    np.testing.assert_array_equal(batch["height"], [SIZE, SIZE, SIZE, 0])
    np.testing.assert_array_equal(batch["width"], [SIZE, SIZE, SIZE, 0])
    assert np.all(batch["mask"][:, SIZE:] == IGNORE_LABEL)
    assert np.all(batch["mask"][:, :, SIZE:] == IGNORE_LABEL)
    assert np.all(batch["raw"][:, SIZE:] == 0) and np.all(batch["image"][:, :, SIZE:] == 0)


def test_eval_batches_reject_an_image_larger_than_pad_to(data_dir):
    ds = pipeline.load_split(NAME, "val", data_dir).take(1)
    with pytest.raises(ValueError, match="larger than pad_to"):
        pipeline.eval_batches(ds, batch_size=1, pad_to=(32, 32))
    def forget_size(x):  # what a split of variable-size images looks like
        return tf.ensure_shape(tf.numpy_function(lambda a: a, [x], x.dtype, stateful=False),
                               (None, None, x.shape[-1]))

    unknown_size = ds.map(
        lambda e: {**e, "image": forget_size(e["image"]), "mask": forget_size(e["mask"])})
    with pytest.raises(tf.errors.InvalidArgumentError, match="val_000000"):
        next(pipeline.eval_batches(unknown_size, batch_size=1, pad_to=(32, 32)))


def test_eval_batches_same_number_on_every_process(data_dir):
    rows = pipeline.rows_per_process(NAME, "val", data_dir, process_count=3)
    per_process = [
        list(pipeline.eval_batches(
            pipeline.load_split(NAME, "val", data_dir, process_index=i, process_count=3),
            batch_size=4, num_rows=rows))
        for i in range(3)]
    assert {len(batches) for batches in per_process} == {3}  # ceil(11 / 4)
    ids = [image_id for batches in per_process for image_id in _valid_ids(batches)]
    assert ids == [f"val_{i:06d}" for i in range(NUM_VAL)]


def test_eval_batches_default_rows_are_the_largest_shard_of_all_processes(data_dir, monkeypatch):
    ds = pipeline.load_split(NAME, "val", data_dir, process_index=1, process_count=3)  # 11 rows
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
    gathered = []

    def allgather(count):
        gathered.append(int(count))
        return np.array([count + 2, count, count - 1])

    monkeypatch.setattr(pipeline.multihost_utils, "process_allgather", allgather)
    batches = list(pipeline.eval_batches(ds, batch_size=4))
    assert gathered == [11]
    assert len(batches) == 4  # ceil(13 / 4)
    assert sum(batch["valid"].sum() for batch in batches) == 11
    with pytest.raises(ValueError, match="smaller than the shard"):
        pipeline.eval_batches(ds, batch_size=4, num_rows=3)


@pytest.fixture
def mask_dir(data_dir, tmp_path):
    """Pseudo-masks for the val split: ground truth shifted by one class, as palette PNGs."""
    for example in tfds.as_numpy(pipeline.load_split(NAME, "val", data_dir)):
        mask = example["mask"][:, :, 0]
        safe_io.write_mask(str(tmp_path / f"{example['id'].decode()}.png"),
                      np.where(mask == IGNORE_LABEL, mask, (mask + 1) % 6))
    return tmp_path


def test_masks_from_dir_are_joined_by_id(data_dir, mask_dir):
    ds = pipeline.load_split(NAME, "val", data_dir).skip(3)  # ids no longer match positions
    joined = pipeline.with_masks_from_dir(ds, str(mask_dir), producer="the 'pseudo' stage")
    for example, original in zip(tfds.as_numpy(joined), tfds.as_numpy(ds)):
        expected = safe_io.read_mask(str(mask_dir / f"{example['id'].decode()}.png"))
        np.testing.assert_array_equal(example["mask"][:, :, 0], expected)
        assert not np.array_equal(example["mask"], original["mask"])
        np.testing.assert_array_equal(example["image"], original["image"])
    batch = next(pipeline.eval_batches(joined, batch_size=4))
    assert batch["mask"].shape == (4, SIZE, SIZE)


def test_masks_from_dir_missing_files(data_dir, mask_dir):
    for index in (4, 9, 17):
        os.remove(mask_dir / f"val_{index:06d}.png")
    ds = pipeline.load_split(NAME, "val", data_dir)
    with pytest.raises(FileNotFoundError) as error:
        pipeline.with_masks_from_dir(ds, str(mask_dir), producer="the 'pseudo' stage")
    message = str(error.value)
    assert "3 of 32" in message and "val_000004.png" in message
    assert "written by the 'pseudo' stage; run it first" in message


def test_masks_from_dir_size_mismatch(data_dir, mask_dir):
    safe_io.write_mask(str(mask_dir / "val_000002.png"), np.zeros((SIZE, SIZE - 1), np.uint8))
    ds = pipeline.load_split(NAME, "val", data_dir)
    joined = pipeline.with_masks_from_dir(ds, str(mask_dir), producer="the 'pseudo' stage")
    with pytest.raises(tf.errors.InvalidArgumentError, match="val_000002"):
        list(tfds.as_numpy(joined))


def test_datasets_built_from_downloads_must_be_prepared_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pmm_jax.data.prepare"):
        pipeline.load_split("voc2012_wsss", "val", str(tmp_path))


def test_pipeline_decodes_jpegs_exactly_as_pil(tmp_path):
    """The pipeline's images equal PIL's decode of the JPEG files (what ``python -m
    pmm_jax.pseudo_masks`` and the official code read), where TensorFlow's default differs."""
    from tests.support.voc_tree import TRAIN_AUG, build, write_voc_tree

    write_voc_tree(tmp_path / "manual")
    build(tmp_path / "manual", tmp_path / "tfds")
    jpegs = tmp_path / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    ds = pipeline.load_split("voc2012_wsss", "train_aug", str(tmp_path / "tfds"),
                             process_index=0, process_count=1)
    tf_default_differs = False
    for ex in ds.as_numpy_iterator():
        path = str(jpegs / f"{ex['id'].decode()}.jpg")
        np.testing.assert_array_equal(ex["image"], safe_io.read_image(path))
        with open(path, "rb") as f:
            tf_default = tf.io.decode_jpeg(f.read(), channels=3).numpy()
        tf_default_differs |= bool(np.any(tf_default != ex["image"]))
    assert ex["id"].decode() == TRAIN_AUG[-1] and tf_default_differs


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("make", ["train", "mmseg"])
def test_a_resumed_stream_is_exactly_the_rest_of_an_uninterrupted_one(data_dir, make):
    """Resuming at step 5 (one epoch is 8 batches; 14 steps cross two epoch boundaries) gives
    the batches 5.. of the stream from 0, for encoded and decoded datasets alike."""
    make = {"train": functools.partial(pipeline.train_batches, crop_size=32, num_foreground=5),
            "mmseg": functools.partial(mmseg_augment.mmseg_train_batches, crop_size=32,
                                       img_scale=(64, 48))}[make]
    encoded = pipeline.load_split(NAME, "train", data_dir, decode=False)
    decoded = pipeline.load_split(NAME, "train", data_dir)
    full = list(itertools.islice(make(encoded, batch_size=8, seed=0, shuffle_buffer=16), 14))
    resumed = list(itertools.islice(
        make(encoded, batch_size=8, seed=0, shuffle_buffer=16, start_step=5), 9))
    _assert_same_batches(resumed, full[5:])
    from_decoded = list(itertools.islice(
        make(decoded, batch_size=8, seed=0, shuffle_buffer=16, start_step=9), 5))
    _assert_same_batches(from_decoded, full[9:])
    assert len({i for batch in full[:8] for i in batch["id"]}) == NUM_TRAIN  # epochs complete


def test_encoded_examples_decode_as_load_split_and_join_masks_lazily(data_dir, mask_dir):
    encoded = pipeline.load_split(NAME, "val", data_dir, decode=False)
    assert encoded.element_spec["image"].dtype == tf.string
    joined = pipeline.with_masks_from_dir(encoded, str(mask_dir), producer="the 'pseudo' stage")
    decoded = pipeline.load_split(NAME, "val", data_dir)
    pairs = zip(tfds.as_numpy(encoded.map(pipeline.decode)), tfds.as_numpy(joined.map(pipeline.decode)),
                tfds.as_numpy(decoded))
    for plain, with_mask, original in itertools.islice(pairs, 4):
        np.testing.assert_array_equal(plain["image"], original["image"])
        np.testing.assert_array_equal(plain["mask"], original["mask"])
        np.testing.assert_array_equal(
            with_mask["mask"][:, :, 0],
            safe_io.read_mask(str(mask_dir / f"{original['id'].decode()}.png")))
