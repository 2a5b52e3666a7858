"""Bad pseudo-masks for the segmenter: a class id outside the dataset fails, naming the file.

(Missing masks and masks whose size differs from the image are covered in test_pipeline.py.)
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pmm_jax.data import builder_base, pipeline
from pmm_jax.files import safe_io

NAME = "synthetic_wsss/tiny"
NUM_CLASSES = 6


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    builder_base.prepare(NAME, directory)
    return pipeline.load_split(NAME, "val", directory).take(4)


def _write_masks(ds, directory, bad_id=None, bad_value=None):
    for example in tfds.as_numpy(ds):
        image_id = example["id"].decode()
        mask = example["mask"][:, :, 0].copy()
        if image_id == bad_id:
            mask[0, 0] = bad_value
        safe_io.write_mask(str(directory / f"{image_id}.png"), mask)


def test_class_id_outside_the_dataset_names_the_file(val_split, tmp_path):
    bad_id = next(iter(tfds.as_numpy(val_split.skip(2))))["id"].decode()
    _write_masks(val_split, tmp_path, bad_id, NUM_CLASSES + 3)
    joined = pipeline.with_masks_from_dir(val_split, str(tmp_path), producer="test",
                                          num_classes=NUM_CLASSES)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{bad_id}\.png holds class ids \[9\] outside 0\.\.5"):
        list(tfds.as_numpy(joined))


def test_ignore_label_and_valid_ids_pass(val_split, tmp_path):
    first = next(iter(tfds.as_numpy(val_split)))["id"].decode()
    _write_masks(val_split, tmp_path, first, 255)
    joined = pipeline.with_masks_from_dir(val_split, str(tmp_path), producer="test",
                                          num_classes=NUM_CLASSES)
    masks = np.stack([example["mask"] for example in tfds.as_numpy(joined)])
    assert masks.shape[0] == 4 and masks[0, 0, 0, 0] == 255
    assert np.all((masks < NUM_CLASSES) | (masks == 255))
