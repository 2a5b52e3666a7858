"""A model replicated over every device, applied to batches sharded over ``"data"``.

What every sharded inference shares (the segmenter's ``trainer.make_predict_fn``, both CAM
methods): the model is split once and its state replicated (``sharding.replicate``); jitted
functions take that state and merge it back into the model in eval mode; host batches
become global arrays sharded over ``"data"`` (``sharding.shard_batch``); results come back
as this process's own rows, in the order it passed them in, as numpy.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from pmm_jax.training import sharding as shd


class ReplicatedModel:
    """``model`` replicated over the mesh of every device (``self.state``, ``self.graphdef``)."""

    def __init__(self, model: nnx.Module):
        self.mesh = shd.make_mesh()
        self.graphdef, state = nnx.split(model)
        self.state = shd.replicate(state, self.mesh)
        self.data = shd.data_sharding(self.mesh)
        self.replicated = shd.replicated(self.mesh)

    def eval_model(self, state) -> nnx.Module:
        """The model of ``state`` (inside a jitted function) in eval mode."""
        model = nnx.merge(self.graphdef, state)
        model.eval()
        return model

    def shard(self, batch: Mapping[str, Any], config_key: str) -> dict[str, jax.Array]:
        """This process's host batch as global arrays sharded over ``"data"`` (``config_key``
        is quoted when its size does not split over the local devices)."""
        return shd.shard_batch(batch, self.mesh, config_key=config_key)

    def local_rows(self, out: Any) -> Any:
        """This process's rows of ``out`` (leaves sharded over ``"data"``) as numpy."""
        local = multihost_utils.global_array_to_host_local_array(
            out, self.mesh, PartitionSpec(shd.DATA_AXIS))
        return jax.device_get(local)
