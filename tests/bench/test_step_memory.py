"""bench/step_memory.py: a train step compiled for an NVIDIA GPU without one, and PyTorch's
saved bytes extrapolated from two small batches.

The GPU compile needs JAX's CUDA plugin and a ``GpuTargetConfigProto`` file
(``PMM_GPU_TARGET_CONFIG``), neither of which CI has; without the plugin the option must say
how to install it.
"""

import argparse
import importlib.util
import os

import pytest

from bench import classifier_step, step_memory


def has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


HAS_CUDA_PLUGIN = has_cuda_plugin()
TARGET_CONFIG = os.environ.get("PMM_GPU_TARGET_CONFIG", "")


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed")
def test_gpu_target_without_the_cuda_plugin_says_how_to_install_it(tmp_path):
    spec = tmp_path / "h200.txtpb"
    spec.write_text('platform_name: "CUDA"\n')
    with pytest.raises(SystemExit, match=r'pip install "jax\[cuda12\]==\d'):
        step_memory.gpu_mesh(str(spec))


@pytest.mark.skipif(not (HAS_CUDA_PLUGIN and TARGET_CONFIG),
                    reason="needs JAX's CUDA plugin and PMM_GPU_TARGET_CONFIG")
def test_a_small_seam_step_compiles_for_the_gpu_target():
    """The trainer's SEAM step, tiny, compiled for the target GPU: cuDNN convolutions, the
    state donated (aliased), a temp buffer that grows with the batch."""
    def compiled(batch):
        args = classifier_step.parse_args(["--method=seam", "--crop=64", f"--batch={batch}",
                                           "--width_div=16", "--blocks=1,1,1,1"])
        step, state, data = classifier_step.build_jax(args)
        return step_memory.compile_for_gpu(step, state, data, TARGET_CONFIG)

    small, large = compiled(4), compiled(16)  # multiples of the 4 test devices
    assert 'custom_call_target="__cudnn$conv' in small.as_text()
    stats = small.memory_analysis()
    assert stats.alias_size_in_bytes > 0 and stats.alias_size_in_bytes <= stats.argument_size_in_bytes
    assert large.memory_analysis().temp_size_in_bytes > 2 * stats.temp_size_in_bytes


def test_pytorch_saved_bytes_extrapolate_from_two_batches():
    """Saved tensors are affine in the batch (the weights' AMP copies once, activations per
    image): batch 3 extrapolated from batches 1 and 2 matches batch 3 measured."""
    args = argparse.Namespace(crop=32, batch=3, dtype="bfloat16", remat=False)
    measured = step_memory.torch_saved_gib("plain", args)
    fitted = step_memory.torch_saved_fit_gib("plain", args, (1, 2))
    assert fitted == pytest.approx(measured, rel=1e-3)
    one = step_memory.torch_saved_gib("plain", argparse.Namespace(**{**vars(args), "batch": 1}))
    assert measured > 1.01 * one  # the batch does enter (the fit is not trivially constant)


def test_torch_fit_batches_must_be_two_increasing_sizes():
    assert step_memory.parse_batches("") is None
    assert step_memory.parse_batches("2,4") == (2, 4)
    for bad in ("4", "4,2", "0,2", "1,2,3"):
        with pytest.raises(SystemExit, match="two increasing batch sizes"):
            step_memory.parse_batches(bad)
