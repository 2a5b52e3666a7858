"""Test set-up shared by the whole suite.

Four virtual CPU devices make every jitted, sharded code path run exactly as it would on a
4-chip host; TensorFlow is kept off any GPU. Both must happen before jax/tf are imported.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

VOC_SAMPLES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc_samples"


@pytest.fixture(scope="session")
def voc_samples_dir():
    """The real VOC photographs beside the project; skips the test when they are absent."""
    if not VOC_SAMPLES.is_dir():
        pytest.skip(f"real VOC samples not found at {VOC_SAMPLES}")
    return VOC_SAMPLES
