"""Tests of pmm_jax/cams/."""
