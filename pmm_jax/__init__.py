"""pmm-jax: Pseudo-mask Matters (PMM, ICCV 2021) in JAX/Flax.

Library code lives in submodules so notebooks can import exactly what they need:
``pmm_jax.masks`` (the paper's jitted core), ``pmm_jax.masks.dense_crf`` (host dense CRF),
``pmm_jax.pseudo_masks``, ``pmm_jax.evaluate``, ``pmm_jax.models``, ``pmm_jax.data``,
``pmm_jax.training.trainer`` and ``pmm_jax.stages``.
"""

__version__ = "0.1.0"
