"""Datasets and input pipelines.

``synthetic`` defines the procedural ``synthetic_wsss`` tensorflow-datasets builder (no
download) and ``prepare``; ``voc`` and ``coco`` build ``voc2012_wsss``/``coco2014_wsss`` from
user downloads (``python -m pmm_jax.data.prepare``). All share one feature layout, so
``pipeline`` serves every one of them: per-process shards, train batches with static shapes,
padded eval batches with a validity mask, and pseudo-masks joined by image id.
"""
