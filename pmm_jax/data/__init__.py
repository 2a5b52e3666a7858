"""Datasets and input pipelines.

``dataset`` is what the stages use: ``open_dataset(config, wd)`` resolves ``config.data``
once into a ``Dataset`` handle (splits, ids, class names, examples, batches, mIoU).
``synthetic`` defines the procedural ``synthetic_wsss`` tensorflow-datasets builder (no
download); ``voc`` and ``coco`` build ``voc2012_wsss``/``coco2014_wsss`` from user downloads
(``python -m pmm_jax.data.prepare``); ``builder_base`` holds what they share. All share one
feature layout, so ``pipeline`` serves every one of them: per-process shards, train batches
with static shapes, padded eval batches with a validity mask, and pseudo-masks joined by
image id.

TensorFlow is imported here, through ``tf_quiet``, before any of them imports it (each needs
it), so that ``TF_CPP_MIN_LOG_LEVEL`` also silences the lines TensorFlow logs while loading.
"""

from pmm_jax.data.tf_quiet import import_tensorflow

import_tensorflow()
