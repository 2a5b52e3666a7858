"""Tests of pmm_jax/masks/."""
