"""Tests of pmm_jax/tools/."""
