"""Tests of pmm_jax/segmentation/."""
