"""The JAX dense CRF (``pmm_jax.masks.dense_crf_jax``): table sizing, input checks and agreement
with pydensecrf (the lattice's own tests: tests/masks/test_permutohedral.py).

Agreement is checked on small synthetic scenes (always) and on the real VOC photographs
(skipped when absent): one full-size image per parameter set, and every sample resized to a
small shape for the batched PPMG binary CRFs and the 21-label CRF. The bar is argmax
agreement >= 99 % of pixels; the posteriors are also required to match closely (the lattice
reproduces densecrf's arithmetic).
"""

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import configs
from pmm_jax.masks import dense_crf, dense_crf_jax
from tests.support.crf_scenes import synthetic_scene

PARAM_SETS = {"pseudo": dense_crf.PSEUDO_MASK_CRF, "test": dense_crf.SEGMENTATION_TEST_CRF}
MIN_AGREEMENT = 0.99
MAX_MEAN_ABS_DIFF = 1e-4
ALPHA = configs.get_config("voc").pseudo.alpha


def soft_maps(label, classes, seed):
    """CAM-like scores in [0, 1] ``[len(classes), H, W]``: blurred class masks plus smooth noise."""
    rng = np.random.default_rng(seed)
    maps = []
    for c in classes:
        mask = gaussian_filter((label == c).astype(np.float32), 4)
        noise = gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 3)
        maps.append(np.clip(mask + 0.5 * noise, 0.0, 1.0))
    return np.stack(maps).astype(np.float32)


def binary_probs(label, cls, seed):
    """A pseudo-mask CRF input ``[(1 - x) ** 11, x]`` for class ``cls``: ``[2, H, W]``."""
    x = soft_maps(label, [cls], seed)[0]
    return np.stack([(1.0 - x) ** ALPHA, x]).astype(np.float32)


def label_probs(label, num_labels, seed):
    """A segmentation-test CRF input: normalised scores over ``num_labels`` labels."""
    scores = soft_maps(label, range(num_labels), seed) + 0.05
    return (scores / scores.sum(0, keepdims=True)).astype(np.float32)


def assert_agrees(reference, output, what):
    """Argmax agreement >= 99 % and a small mean absolute posterior difference."""
    agreement = float((reference.argmax(-3) == output.argmax(-3)).mean())
    mean_abs = float(np.abs(reference - output).mean())
    print(f"{what}: argmax agreement {100 * agreement:.3f} %, mean abs diff {mean_abs:.2e}")
    assert agreement >= MIN_AGREEMENT, f"{what}: agreement {agreement:.4f}"
    assert mean_abs <= MAX_MEAN_ABS_DIFF, f"{what}: mean abs diff {mean_abs:.2e}"


# --- table sizes -----------------------------------------------------------------------------

def test_host_wrappers_raise_on_overflow_and_grow_their_tables(monkeypatch):
    """A table smaller than the lattice raises in the host wrappers; the automatic sizing
    grows its tables (the lattice's own overflow report: tests/masks/test_permutohedral.py)."""
    image, label = synthetic_scene(20, 24, seed=1)
    probs = binary_probs(label, 1, seed=0)
    params = dense_crf.PSEUDO_MASK_CRF
    tiny = dense_crf_jax.LatticeCapacity(256, 256)
    with pytest.raises(dense_crf_jax.LatticeOverflowError, match="table holds 256"):
        dense_crf_jax.dense_crf(image, probs, params, capacity=tiny)

    monkeypatch.setattr(dense_crf_jax, "_capacity_cache", {})
    monkeypatch.setattr(dense_crf_jax, "initial_capacity", lambda *_: tiny)
    grown = dense_crf_jax.dense_crf(image, probs, params)
    capacity = dense_crf_jax._capacity_cache[(20, 24, params)]
    assert capacity.bilateral > 256  # the Gaussian lattice of 20 x 24 pixels fits 256
    assert_agrees(dense_crf.dense_crf(image, probs, params), grown, "grown tables")


def test_input_validation():
    image, label = synthetic_scene(20, 24, seed=1)
    probs = binary_probs(label, 1, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf_jax.dense_crf(image.astype(np.float32), probs, dense_crf.PSEUDO_MASK_CRF)
    with pytest.raises(ValueError, match="does not match"):
        dense_crf_jax.dense_crf(image, probs[:, :10], dense_crf.PSEUDO_MASK_CRF)
    with pytest.raises(TypeError, match="CRFParams"):
        dense_crf_jax.dense_crf(image, probs, {"gauss_sxy": 3})


# --- agreement with pydensecrf --------------------------------------------------------------
# Small images share one shape and one explicit (never overflowing) capacity, so every test
# below reuses the same compiled lattices and mean fields.

SMALL_SHAPE = (96, 128)
SMALL_CAPACITY = dense_crf_jax.hard_capacity(*SMALL_SHAPE)


def check_small(image, label, params, what, seed):
    """Three binary CRFs in one batched pass (PPMG) and one 21-label CRF against pydensecrf."""
    classes = [c for c in np.unique(label) if c != 0][:3]
    classes += [c for c in range(1, 21) if c not in classes][:3 - len(classes)]
    binary = np.stack([binary_probs(label, c, seed + i) for i, c in enumerate(classes)])
    batched = dense_crf_jax.dense_crf_batched(image, binary, params, capacity=SMALL_CAPACITY)
    for s in range(3):
        assert_agrees(dense_crf.dense_crf(image, binary[s], params), batched[s],
                      f"{what} 2 labels, set {s}")
    probs = label_probs(label, 21, seed)
    output = dense_crf_jax.dense_crf(image, probs, params, capacity=SMALL_CAPACITY)
    assert output.shape == probs.shape and output.dtype == np.float32
    np.testing.assert_allclose(output.sum(0), 1.0, rtol=1e-5)
    assert_agrees(dense_crf.dense_crf(image, probs, params), output, f"{what} 21 labels")


@pytest.mark.parametrize("param_set", sorted(PARAM_SETS))
def test_synthetic_agreement(param_set):
    image, label = synthetic_scene(*SMALL_SHAPE, seed=3)
    check_small(image, label, PARAM_SETS[param_set], f"synthetic {param_set}", seed=4)


def test_padded_images_match_single_images():
    """Several images of different sizes (and label-set counts) in one padded call."""
    scenes = [synthetic_scene(40, 56, seed=6), synthetic_scene(48, 64, seed=7)]
    probs = [np.stack([binary_probs(label, c, seed=c) for c in range(1, 1 + k)])
             for (_, label), k in zip(scenes, (2, 3))]
    images = [image for image, _ in scenes]
    params = dense_crf.PSEUDO_MASK_CRF
    outputs = dense_crf_jax.dense_crf_images(images, probs, params)
    for image, p, output in zip(images, probs, outputs):
        assert output.shape == p.shape
        for s in range(p.shape[0]):
            assert_agrees(dense_crf.dense_crf(image, p[s], params), output[s], "padded batch")


@pytest.fixture(scope="module")
def voc_samples(voc_samples_dir):
    """``[(id, image uint8 [H, W, 3], label [H, W] 0..20)]`` of the real VOC samples."""
    samples = []
    for path in sorted(voc_samples_dir.glob("*_label.png")):
        image_id = path.name[:-len("_label.png")]
        image = np.asarray(Image.open(path.with_name(image_id + ".png")).convert("RGB"))
        samples.append((image_id, image, np.asarray(Image.open(path))))
    assert samples, f"no samples in {voc_samples_dir}"
    return samples


@pytest.mark.parametrize("param_set", sorted(PARAM_SETS))
def test_voc_full_size_agreement(voc_samples, param_set):
    """One full-size photograph per parameter set: a PMM binary pseudo-mask CRF.

    The bilateral table holds N points: enough for this image with both parameter sets
    (0.07 N and 0.65 N points); an overflow would raise, never pass silently.
    """
    params = PARAM_SETS[param_set]
    image_id, image, label = voc_samples[0]
    height, width = label.shape
    capacity = dense_crf_jax.LatticeCapacity(
        dense_crf_jax.initial_capacity(height, width, params).gaussian, height * width)
    counts = np.bincount(label.ravel(), minlength=21)
    probs = binary_probs(label, int(counts[1:].argmax()) + 1, seed=0)
    assert_agrees(dense_crf.dense_crf(image, probs, params),
                  dense_crf_jax.dense_crf(image, probs, params, capacity=capacity),
                  f"VOC {image_id} full size {param_set} 2 labels")


@pytest.mark.parametrize("param_set", sorted(PARAM_SETS))
def test_voc_all_samples_small(voc_samples, param_set):
    """Every photograph resized to the small shape: PPMG binary CRFs and a 21-label CRF."""
    size = SMALL_SHAPE[::-1]
    for i, (image_id, image, label) in enumerate(voc_samples):
        small_image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        small_label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        check_small(small_image, small_label, PARAM_SETS[param_set],
                    f"VOC {image_id} small {param_set}", seed=i)
