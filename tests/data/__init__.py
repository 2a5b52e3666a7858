"""Tests of pmm_jax/data/."""
