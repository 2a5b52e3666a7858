"""Tests of pmm_jax/training/."""
