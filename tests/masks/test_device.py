"""pmm_jax.masks.device: the whole per-image path jitted on the device (``crf.backend=jax``)
against the numpy path of the CPU workers on the same CRF (``masks/core.py`` on numpy, then
``dense_crf_jax`` one image at a time), on synthetic scenes and real VOC photographs.

The two paths differ only in float rounding (XLA's reductions and fused arithmetic against
numpy's); the masks must agree on all but ``MAX_DIFFERING`` of the pixels.
"""

import os

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pmm_jax.files import safe_io
from pmm_jax.masks import core, dense_crf_jax, device, worker
from pmm_jax.masks import generator as pm

# Share of pixels on which the device's masks may differ from the numpy path's.
MAX_DIFFERING = 1e-4


def cams_for(labels, rng, sigma):
    """Blurred, uneven, non-negative CAMs of a label map's classes (as a classifier's)."""
    cams = {}
    for c in np.unique(labels):
        if c in (0, 255):
            continue
        mask = (labels == c).astype(np.float64)
        cam = gaussian_filter(mask, sigma) * rng.uniform(0.5, 3.0)
        cam += np.abs(rng.normal(0, 0.03, cam.shape)) * gaussian_filter(mask, 3 * sigma)
        cams[int(c) - 1] = cam.astype(np.float32)
    return cams


def scene(rng, height, width, classes):
    """Discs on a noisy background: ``(image, cams)``."""
    yy, xx = np.mgrid[:height, :width]
    image = rng.normal(110, 20, (height, width, 3))
    labels = np.zeros((height, width), np.uint8)
    for c in classes:
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.15, 0.3) * min(height, width)) ** 2
        labels[disc] = c + 1
        image[disc] = rng.uniform(0, 255, 3) + rng.normal(0, 8, (disc.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), cams_for(labels, rng, 2.5)


def numpy_path_mask(image, cams, settings):
    """The workers' mask with the jax CRF: numpy core, one image, present classes only."""
    classes = sorted(cams)
    x, probs = core.crf_inputs(np, settings.variant, np.stack([cams[c] for c in classes]),
                               settings.alpha, settings.t, settings.s, settings.official_minmax)
    posterior = dense_crf_jax.dense_crf_padded(image, probs, settings.crf)
    return worker.lookup(classes)[core.label_indices(np, settings.variant, x, posterior)]


def compare(records, cfg, out_dir):
    """``(differing pixels, pixels)`` of the device path (``generate``) against the numpy
    path over ``records``."""
    stats = pm.generate(records, out_dir, cfg, process_index=0, process_count=1)
    assert stats["written"] == len(records) and stats["failed"] == 0
    settings = pm.settings_of(cfg)
    differing = total = 0
    for image_id, image, cams in records:
        ours = safe_io.read_mask(os.path.join(out_dir, f"{image_id}.png"))
        want = numpy_path_mask(image, cams, settings)
        assert ours.shape == want.shape
        differing += int(np.count_nonzero(ours != want))
        total += ours.size
    return differing, total


def jax_config(method, **overrides):
    cfg = pm.default_config(method)
    cfg.num_classes = 21
    cfg.crf.backend = "jax"
    cfg.device_batch = 2
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def scenes():
    """Three scenes in one 64 x 64 bucket: two with two classes (one batch), one with three
    (binary variants pad it to four classes)."""
    rng = np.random.default_rng(0)
    layout = [((64, 64), [3, 11]), ((56, 60), [0, 19]), ((40, 64), [2, 5, 7])]
    return [(f"s{i}", *scene(rng, *shape, classes)) for i, (shape, classes) in enumerate(layout)]


@pytest.mark.parametrize("method, overrides", [
    ("ppmg", {"official_minmax": True}), ("crf_cvs", {}), ("rough", {})])
def test_device_path_equals_numpy_path_on_synthetic_scenes(tmp_path, scenes, method, overrides):
    differing, total = compare(scenes, jax_config(method, **overrides), str(tmp_path))
    print(f"{method} {overrides}: {differing} of {total} pixels differ")
    assert differing <= MAX_DIFFERING * total


@pytest.mark.parametrize("method", ["ppmg", "baseline"])
def test_device_path_equals_numpy_path_on_voc_photographs(tmp_path, voc_samples_dir, method):
    rng = np.random.default_rng(3)
    records = []
    for image_id in ("2007_000129", "2007_000847"):
        image = safe_io.read_image(str(voc_samples_dir / f"{image_id}.png"))
        labels = safe_io.read_mask(str(voc_samples_dir / f"{image_id}_label.png"))
        records.append((image_id, image, cams_for(labels, rng, 12)))
    differing, total = compare(records, jax_config(method), str(tmp_path))
    print(f"{method}: {differing} of {total} pixels differ")
    assert differing <= MAX_DIFFERING * total


def test_bucket_pads_binary_class_counts_to_powers_of_two():
    ppmg, baseline = (pm.settings_of(pm.default_config(m)).variant for m in ("ppmg", "baseline"))
    assert device.bucket(375, 500, 3, ppmg) == (384, 512, 4)
    assert device.bucket(375, 500, 3, baseline) == (384, 512, 3)
    assert device.bucket(64, 65, 1, ppmg) == (64, 128, 1)


def test_device_core_is_the_two_halves_run_batch_calls(scenes):
    """``device_core`` (one program, what a compile table lowers) gives ``run_batch``'s labels
    and the lattices' stats within the given table sizes."""
    settings = pm.settings_of(jax_config("ppmg"))
    (_, a_image, a_cams), (_, b_image, b_cams) = scenes[:2]
    images, cams = [a_image, b_image], [np.stack([c[k] for k in sorted(c)]) for c in (a_cams,
                                                                                      b_cams)]
    want = device.run_batch(images, cams, settings, batch_size=2)
    padded_images = np.zeros((2, 64, 64, 3), np.uint8)
    padded_cams = np.zeros((2, 2, 64, 64), np.float32)
    valid = np.zeros((2, 64, 64), bool)
    for b, (image, cam) in enumerate(zip(images, cams)):
        h, w = image.shape[:2]
        padded_images[b, :h, :w], padded_cams[b, :, :h, :w], valid[b, :h, :w] = image, cam, True
    capacity = dense_crf_jax.hard_capacity(64, 64)
    labels, stats = device.device_core(
        padded_images, padded_cams, np.ones((2, 2), bool), valid, settings.alpha, settings.t,
        settings.s, variant=settings.variant, params=settings.crf, capacity=capacity)
    dense_crf_jax.check_stats(stats, capacity)
    for b, image in enumerate(images):
        h, w = image.shape[:2]
        np.testing.assert_array_equal(np.asarray(labels)[b, :h, :w], want[b])
        assert np.all(np.asarray(labels)[b][~valid[b]] == 0)


def test_lower_device_core_from_shapes():
    settings = pm.settings_of(jax_config("crf_cvs"))
    lowered = device.lower_device_core(4, 128, 192, 3, settings.variant, settings.crf)
    assert "tensor<4x128x192x3xui8>" in lowered.as_text()  # the images argument
