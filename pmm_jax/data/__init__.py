"""Datasets and input pipelines.

``synthetic`` defines the procedural ``synthetic_wsss`` tensorflow-datasets builder (no
download) and ``prepare``; ``voc`` and ``coco`` build ``voc2012_wsss``/``coco2014_wsss`` from
user downloads (``python -m pmm_jax.data.prepare``). All share one feature layout, so
``pipeline`` serves every one of them: per-process shards, train batches with static shapes,
padded eval batches with a validity mask, and pseudo-masks joined by image id.

TensorFlow is imported here, through ``tf_quiet``, before any of them imports it (each needs
it), so that ``TF_CPP_MIN_LOG_LEVEL`` also silences the lines TensorFlow logs while loading.
"""

from pmm_jax.data.tf_quiet import import_tensorflow

import_tensorflow()
