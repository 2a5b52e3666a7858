"""The test suite; its folders mirror the package (tests/masks/ tests pmm_jax/masks/, ...)."""
