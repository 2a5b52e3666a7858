"""pmm_jax.masks.dense_crf: parameters, input validation, and behaviour on synthetic and real images."""

import dataclasses

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pmm_jax.masks import dense_crf


def two_tone_image(height=24, width=32):
    """Left half dark, right half bright, with mild noise."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 40, np.int32)
    image[:, width // 2:] = 210
    image += rng.integers(-5, 6, image.shape)
    return image.astype(np.uint8)


# ------------------------------------------------------------------------------ parameters

def test_params_defaults_and_presets():
    assert dense_crf.PSEUDO_MASK_CRF == dense_crf.CRFParams(3.0, 10.0, 80.0, 13.0, 10.0, 10)
    assert dataclasses.astuple(dense_crf.SEGMENTATION_TEST_CRF) == (1.0, 3.0, 67.0, 3.0, 4.0, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dense_crf.PSEUDO_MASK_CRF.iterations = 5


def test_params_from_config():
    params = dense_crf.CRFParams.from_config({"gauss_sxy": 1, "iterations": 5})
    assert params == dense_crf.CRFParams(gauss_sxy=1, iterations=5)
    assert dense_crf.CRFParams.from_config({}) == dense_crf.PSEUDO_MASK_CRF
    config = ml_collections.ConfigDict(dataclasses.asdict(dense_crf.SEGMENTATION_TEST_CRF))
    assert dense_crf.CRFParams.from_config(config) == dense_crf.SEGMENTATION_TEST_CRF
    with pytest.raises(ValueError, match="bilateral_rgb"):
        dense_crf.CRFParams.from_config({"bilateral_rgb": 13})
    with pytest.raises(TypeError):
        dense_crf.CRFParams.from_config([("gauss_sxy", 3)])
    with pytest.raises(ValueError, match="iterations"):
        dense_crf.CRFParams(iterations=2.5)
    with pytest.raises(ValueError, match="gauss_sxy"):
        dense_crf.CRFParams(gauss_sxy=0)


# ------------------------------------------------------------------------ input validation

@pytest.mark.parametrize("image, probs, message", [
    (np.zeros((8, 8), np.uint8), np.full((2, 8, 8), 0.5), r"\[H, W, 3\]"),
    (np.zeros((8, 8, 4), np.uint8), np.full((2, 8, 8), 0.5), r"\[H, W, 3\]"),
    (np.zeros((8, 8, 3), np.float32), np.full((2, 8, 8), 0.5), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.5), r"\[L, H, W\]"),
    (np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 9), 0.5), "does not match"),
    (np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), np.nan), "finite"),
])
def test_dense_crf_rejects_bad_shapes(image, probs, message):
    with pytest.raises(ValueError, match=message):
        dense_crf.dense_crf(image, probs, dense_crf.PSEUDO_MASK_CRF)


def test_dense_crf_rejects_non_params():
    with pytest.raises(TypeError):
        dense_crf.dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), 0.5), {"gauss_sxy": 3})


# --------------------------------------------------------------------- synthetic behaviour

def test_zero_iterations_is_the_normalised_clipped_unary():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 24, 32)).astype(np.float32)
    probs[0, :4] = 0.0  # clipped to 1e-5 before the log
    out = dense_crf.dense_crf(two_tone_image(), probs, dense_crf.CRFParams(iterations=0))
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(0), rtol=1e-4, atol=1e-6)


def test_confident_region_stays_and_posterior_is_a_distribution():
    image = two_tone_image()
    probs = np.full((2, 24, 32), 0.5, np.float32)
    probs[1, :, 16:] = 0.99       # confident foreground on the bright half
    probs[0, :, 16:] = 0.01
    probs[1, 10:14, 4:8] = 0.6    # weak, isolated foreground blob on the dark half
    probs[0, 10:14, 4:8] = 0.4
    probs[0, :, :16] += 0.1       # dark half mildly background
    for params in (dense_crf.PSEUDO_MASK_CRF, dense_crf.SEGMENTATION_TEST_CRF):
        out = dense_crf.dense_crf(image, probs, params)
        assert out.shape == (2, 24, 32) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
        labels = out.argmax(0)
        assert np.all(labels[:, 16:] == 1)
    # The strong pseudo-mask CRF smooths the weak blob away into the surrounding background.
    assert np.all(dense_crf.dense_crf(image, probs, dense_crf.PSEUDO_MASK_CRF).argmax(0)[:, :16] == 0)


def test_non_contiguous_and_read_only_inputs_give_the_same_result():
    rng = np.random.default_rng(2)
    image = np.asfortranarray(two_tone_image())
    probs = rng.random((2, 32, 24)).astype(np.float64).transpose(0, 2, 1)  # a strided view
    assert not image.flags.c_contiguous and not probs.flags.c_contiguous
    out = dense_crf.dense_crf(image, probs, dense_crf.PSEUDO_MASK_CRF)
    frozen_image, frozen_probs = np.array(image, order="C"), np.array(probs)
    frozen_image.flags.writeable = frozen_probs.flags.writeable = False  # as PIL / JAX give
    np.testing.assert_array_equal(
        dense_crf.dense_crf(frozen_image, frozen_probs, dense_crf.PSEUDO_MASK_CRF), out)
    want = dense_crf.dense_crf(np.ascontiguousarray(image), np.ascontiguousarray(probs),
                         dense_crf.PSEUDO_MASK_CRF)
    np.testing.assert_array_equal(out, want)


# ------------------------------------------------------------------------ real photographs

def load_sample(directory, image_id):
    image = np.asarray(Image.open(directory / f"{image_id}.png").convert("RGB"))
    label = np.asarray(Image.open(directory / f"{image_id}_label.png"))
    return image, label


def test_crf_on_real_photographs_follows_the_label(voc_samples_dir):
    """A label-derived unary survives the CRF; a noisy one is pulled back towards the label."""
    ids = sorted(p.stem for p in voc_samples_dir.glob("*.png") if not p.stem.endswith("_label"))
    assert ids, f"no images in {voc_samples_dir}"
    rng = np.random.default_rng(0)
    for image_id in ids[:2]:
        image, label = load_sample(voc_samples_dir, image_id)
        classes = np.unique(label)
        onehot = (label[None] == classes[:, None, None]).astype(np.float32)
        # Coarse 16x16 block noise: each block leans towards random classes.
        height, width = label.shape
        noise = rng.random((len(classes), height // 16 + 1, width // 16 + 1))
        noise = np.kron(noise, np.ones((16, 16)))[:, :height, :width]
        for weight, min_agreement in ((0.5, 0.9), (0.3, 0.85)):
            probs = weight * onehot + (1 - weight) * noise
            probs /= probs.sum(0, keepdims=True)
            before = np.mean(classes[probs.argmax(0)] == label)
            posterior = dense_crf.dense_crf(image, probs, dense_crf.PSEUDO_MASK_CRF)
            after = np.mean(classes[posterior.argmax(0)] == label)
            np.testing.assert_allclose(posterior.sum(0), 1.0, atol=1e-4)
            assert after > min_agreement, (image_id, weight, before, after)
            if before < 0.9:  # a noisy unary: the image-aware smoothing repairs it
                assert after > before + 0.05, (image_id, weight, before, after)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie awaiting a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[1:2] == ["Z"] for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return True


def test_pool_workers_exit_when_their_parent_is_killed():
    """``kill -9`` of the process owning a CRF pool: its workers exit within seconds instead
    of outliving the run (pseudo-mask generation and the segmentation test share the pool)."""
    import signal
    import subprocess
    import sys
    import time

    script = ("import os, time\nfrom pmm_jax.masks import dense_crf\n"
              "pool = dense_crf.process_pool(2)\n"
              "pids = {pool.submit(time.sleep, 0.2) and f.result() for f in "
              "[pool.submit(os.getpid) for _ in range(8)]}\n"
              "print(' '.join(map(str, sorted(pids))), flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and not any(map(_gone, workers))
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(map(_gone, workers)), f"workers {workers} outlived their parent"
    finally:
        parent.kill()
        parent.wait()
