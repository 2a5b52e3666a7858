"""Tests of pmm_jax/stages/."""
