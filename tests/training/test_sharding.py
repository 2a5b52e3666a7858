"""Mesh, shardings and host batch -> global sharded arrays on 4 virtual CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from pmm_jax.training import sharding


def test_mesh_spans_all_devices_on_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 4
    assert sharding.data_sharding(mesh).spec == PartitionSpec("data")
    assert sharding.replicated(mesh).spec == PartitionSpec()


def test_shard_batch_splits_rows_over_devices_and_drops_ids():
    mesh = sharding.make_mesh()
    batch = {"image": np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3),
             "valid": np.array([True] * 6 + [False] * 2),
             "id": np.array([b"a%d" % i for i in range(8)])}
    out = sharding.shard_batch(batch, mesh)
    assert set(out) == {"image", "valid"}, "bytes ids stay host-side"
    for key, array in out.items():
        assert array.sharding == sharding.data_sharding(mesh)
        assert [shard.data.shape[0] for shard in array.addressable_shards] == [2, 2, 2, 2]
        np.testing.assert_array_equal(np.asarray(array), batch[key])


def test_batch_not_divisible_by_devices_names_the_config_key():
    batch = {"image": np.zeros((6, 2), np.float32)}
    with pytest.raises(ValueError, match=r"6 is not divisible by the 4 local devices.*"
                                         r"config\.seg\.batch_size.*multiple of 4"):
        sharding.shard_batch(batch, sharding.make_mesh(), config_key="config.seg.batch_size")


def test_entries_with_different_batch_sizes_are_rejected():
    batch = {"image": np.zeros((8, 2), np.float32), "mask": np.zeros((4, 2), np.int32)}
    with pytest.raises(ValueError, match="disagree on the batch size"):
        sharding.shard_batch(batch, sharding.make_mesh())
