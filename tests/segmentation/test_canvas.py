"""pmm_jax/segmentation/canvas.py: images of any size on a fixed canvas and labels back."""

import numpy as np
import pytest

from pmm_jax.segmentation import canvas


def test_an_image_that_fits_is_padded_with_the_mean_colour():
    image = np.random.default_rng(0).integers(0, 255, (10, 7, 3), dtype=np.uint8)
    x, raw, inner = canvas.fit(image, (16, 8))
    assert inner == (10, 7) and x.shape == (16, 8, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(raw[:10, :7], image)
    assert not x[10:].any() and not x[:, 7:].any() and not raw[10:].any()
    np.testing.assert_allclose(x[:10, :7], (image / 255.0 - canvas.MEAN) / canvas.STD, rtol=1e-6)


def test_a_larger_image_is_shrunk_keeping_its_aspect_and_labels_come_back_at_its_size():
    image = np.zeros((40, 100, 3), np.uint8)
    image[:, 50:] = 200
    x, raw, inner = canvas.fit(image, (16, 16))
    assert inner == (6, 16)
    assert raw[:6, :7].max() == 0 and raw[:6, 9:].min() == 200  # no smearing beyond the filter
    labels = np.zeros((16, 16), np.uint8)
    labels[:6, 8:] = 3
    back = canvas.restore(labels, inner, (40, 100))
    assert back.shape == (40, 100) and back.dtype == np.uint8
    assert (back[:, :50] == 0).all() and (back[:, 50:] == 3).all()


def test_greyscale_is_repeated_and_other_arrays_are_refused():
    assert canvas.as_rgb(np.zeros((3, 4), np.uint8)).shape == (3, 4, 3)
    with pytest.raises(ValueError, match=r"uint8 RGB image \[H, W, 3\], got float32"):
        canvas.as_rgb(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \[3, 4, 4\]"):
        canvas.as_rgb(np.zeros((3, 4, 4), np.uint8))


def _dense_shrink(image, size):
    """The reference: the whole antialiased linear filter as one contraction (exact but
    image pixels x canvas pixels in time, a float64 copy of the image in memory)."""
    def matrix(source, target):
        scale = source / target
        support = max(scale, 1.0)
        centres = (np.arange(target) + 0.5) * scale
        weights = np.maximum(0.0, 1.0 - np.abs(np.arange(source)[None, :] + 0.5
                                                - centres[:, None]) / support)
        return weights / weights.sum(axis=1, keepdims=True)

    return np.einsum("ih,hwc,jw->ijc", matrix(image.shape[0], size[0]),
                     image.astype(np.float64), matrix(image.shape[1], size[1]))


def test_shrink_equals_the_whole_filter_at_once_up_to_ties_in_exact_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(120):
        height, width = (int(v) for v in rng.integers(2, 160, 2))
        size = canvas.fitted_size((height, width), tuple(int(v) for v in rng.integers(1, 64, 2)))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        exact = _dense_shrink(image, size)
        ours = canvas.shrink(image, size)
        differ = np.rint(exact) != ours
        # Only a value that is a tie (x.5) can round either way, by its last bits.
        assert np.all(np.abs(exact[differ] - np.floor(exact[differ]) - 0.5) < 1e-9)
        assert np.abs(np.rint(exact) - ours).max() <= 1


def test_shrink_needs_memory_of_the_output_not_of_the_image():
    import tracemalloc

    image = np.random.default_rng(1).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        small = canvas.shrink(image, (12, 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert small.shape == (12, 16, 3)
    assert peak < image.nbytes / 2, peak  # the dense contraction copies the image as float64
