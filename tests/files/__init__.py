"""Tests of pmm_jax/files/."""
