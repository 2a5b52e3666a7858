"""Tests of pmm_jax/models/."""
