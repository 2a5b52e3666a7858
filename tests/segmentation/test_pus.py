"""pmm_jax.segmentation.pus (the PUS loss) against its value and gradient written out by hand
in numpy, every mode and reduction."""

import functools

import jax
import numpy as np
import pytest

from pmm_jax.segmentation import pus


def np_pus(logits, labels, mode, beta, kappa, reduction="all"):
    """Loss value and its gradient w.r.t. the logits, written out by hand (float64)."""
    logits = logits.astype(np.float64)
    num_classes = logits.shape[-1]
    shifted = logits - logits.max(-1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    ignored = labels == 255
    safe = np.where(ignored, 0, labels)
    onehot = np.eye(num_classes)[safe]
    loss = np.where(ignored, 0.0, -np.log((softmax * onehot).sum(-1)))
    dloss = np.where(ignored, 0.0, 1.0)  # d(pus(L)) / dL per pixel
    if mode != "none" and loss.mean() < beta:
        if mode == "clamp":
            dloss = dloss * (loss < kappa)
            loss = np.minimum(loss, kappa)
        elif mode == "pow":
            dloss = dloss * kappa * (loss + 1e-9) ** (kappa - 1)
            loss = (loss + 1e-9) ** kappa
        elif mode == "ignore":
            dloss = dloss * (loss <= kappa)
            loss = loss * (loss <= kappa)
    if reduction == "all":
        denom = loss.size
        value = loss.sum() / denom
    else:
        denom = max((~ignored).sum(), 1)
        value = np.where(ignored, 0.0, loss).sum() / denom
    grad = (dloss / denom)[..., None] * (softmax - onehot)
    return value, grad


# ------------------------------------------------------------------------------- PUS loss

K = 5


def pus_inputs(rng, scale=2.0, ignore_fraction=0.2):
    logits = (scale * rng.standard_normal((2, 6, 7, K))).astype(np.float32)
    labels = rng.integers(0, K, (2, 6, 7))
    labels[rng.random(labels.shape) < ignore_fraction] = 255
    return logits, labels


@functools.partial(jax.jit, static_argnames=("mode", "reduction"))
def pus_value_and_grad(logits, labels, beta, kappa, mode, reduction):
    """jit(value_and_grad(pus_loss)); beta and kappa are traced, so one compile serves both."""
    return jax.value_and_grad(lambda lg: pus.pus_loss(
        lg, labels, mode=mode, beta=beta, kappa=kappa, reduction=reduction))(logits)


@pytest.mark.parametrize("mode, reduction", [
    ("none", "all"), ("clamp", "all"), ("pow", "all"), ("ignore", "all"),
    ("clamp", "valid_pixels"), ("pow", "valid_pixels"),
])
def test_pus_value_and_gradient_match_numpy(rng, mode, reduction):
    logits, labels = pus_inputs(rng)
    kappa = 0.5 if mode != "pow" else 0.7
    for beta in (100.0, 0.0):  # always warm / never warm
        value, grad = pus_value_and_grad(logits, labels, beta, kappa, mode, reduction)
        # np_pus applies pow to every pixel like the official code (ignored ones add
        # 1e-9 ** kappa under reduction "all").
        want_value, want_grad = np_pus(logits, labels, mode, beta, kappa, reduction)
        np.testing.assert_allclose(float(value), want_value, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
        assert np.all(np.asarray(grad)[labels == 255] == 0)


def test_pus_warm_up_threshold_uses_mean_over_all_pixels(rng):
    logits, labels = pus_inputs(rng, ignore_fraction=0.5)

    def loss(beta, kappa, reduction="all"):
        return float(pus_value_and_grad(logits, labels, beta, kappa, "clamp", reduction)[0])

    plain = loss(0.0, 0.1)  # beta 0: never warm, plain CE
    valid_mean = loss(0.0, 0.1, "valid_pixels")
    assert plain < valid_mean  # ignored pixels stay in the denominator
    # beta between the two means: the all-pixel mean is below it, so clamping is active.
    assert loss((plain + valid_mean) / 2, 0.1) < plain
    # beta just below the mean: no suppression.
    assert loss(plain * 0.99, 0.1) == pytest.approx(plain, rel=1e-6)


def test_pus_clamped_pixels_have_zero_gradient(rng):
    logits, labels = pus_inputs(rng, scale=3.0, ignore_fraction=0.0)
    kappa = 0.5
    _, grad = pus_value_and_grad(logits, labels, 1e3, kappa, "clamp", "all")
    grad = np.asarray(grad)
    shifted = logits - logits.max(-1, keepdims=True)
    nll = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))
    loss = np.take_along_axis(nll, labels[..., None], -1)[..., 0]
    assert (loss > kappa).any() and (loss < kappa).any()
    assert np.all(grad[loss > kappa] == 0)
    assert np.all(np.abs(grad[loss < kappa]).sum(-1) > 0)


def test_pus_all_ignored_and_errors(rng):
    logits, labels = pus_inputs(rng)
    labels[:] = 255
    for reduction in ("all", "valid_pixels"):
        value, grad = pus_value_and_grad(logits, labels, 0.5, 0.5, "clamp", reduction)
        assert float(value) == 0.0 and not np.any(np.asarray(grad))
    with pytest.raises(ValueError, match="clamp"):
        pus.pus_loss(logits, labels, mode="clip", beta=0.5, kappa=0.5)
    with pytest.raises(ValueError, match="valid_pixels"):
        pus.pus_loss(logits, labels, mode="clamp", beta=0.5, kappa=0.5, reduction="mean")
