"""pmm_jax.masks against direct numpy transcriptions of the paper / official formulas.

The ``np_*`` functions below are deliberately naive per-class loops over the PRESENT classes
only (a dict of present classes, like the official code) and over the valid pixels only, so
that they share no masking tricks with the jnp implementation they check.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pmm_jax.masks import cvs, ppmg
from pmm_jax.segmentation import pus

C, H, W = 4, 12, 10
T, S, ALPHA = 0.05, 0.3, 11.0


# ---------------------------------------------------------------------------- transcriptions

def np_normalize(cams, present, valid, official_quirk):
    out = np.zeros(cams.shape, np.float64)
    for c in np.flatnonzero(present):
        v = cams[c].astype(np.float64)
        lo, hi = v[valid].min(), v[valid].max()
        if official_quirk:
            v = v.copy()
            v[v < lo + 1e-5] = 0
        out[c][valid] = ((v - lo) / (hi - lo + 1e-5))[valid]
    return out


def np_cov(x, present, t, valid):
    out = np.zeros(len(x))
    for c in np.flatnonzero(present):
        vals = x[c][valid].astype(np.float64)
        vals = vals[vals > t]
        if vals.size:
            out[c] = vals.std() / (vals + 1e-8).mean()
    return out


def np_cvs(x, present, t, s, valid):
    cov = np_cov(x, present, t, valid) * s
    out = np.zeros(x.shape)
    for c in np.flatnonzero(present):
        v = x[c].astype(np.float64).copy()
        v[v < t] = 0
        out[c][valid] = (v ** (1 - cov[c]))[valid]
    return out


def np_binary_probs(x_s, alpha):
    out = np.zeros((x_s.shape[0], 2) + x_s.shape[1:])
    for c in range(x_s.shape[0]):
        out[c, 0] = np.power(1 - x_s[c].astype(np.float64), alpha)
        out[c, 1] = x_s[c]
    return out


def np_baseline_probs(x, present, alpha):
    out = np.zeros((x.shape[0] + 1,) + x.shape[1:])
    keys = np.flatnonzero(present)
    if keys.size:
        v = np.stack([x[c] for c in keys]).astype(np.float64)
        out[0] = np.power(1 - v.max(axis=0), alpha)
    else:
        out[0] = 1.0
    for c in keys:
        out[c + 1] = x[c]
    return out


def np_proportion(x, fg, valid):
    out = np.zeros(x.shape)
    for c in range(x.shape[0]):
        v = x[c].astype(np.float64)
        out[c][valid] = (v / (1 + (v * fg[c])[valid].sum()))[valid]
    return out


def np_ppmg(x, fg, present, valid):
    """The official PPMG loop: background starts at 1 and loses every claimed pixel."""
    foreground = [np.ones(x.shape[1:])]
    importance = [foreground[0]]
    keys = [0]
    for c in np.flatnonzero(present):
        v = x[c].astype(np.float64)
        fg_c = (fg[c] & valid).astype(np.float64)
        foreground.append(fg_c)
        importance.append(v / (1 + (v * fg_c).sum()))
        keys.append(c + 1)
        foreground[0] = foreground[0] * (fg_c == 0)
        importance[0] = foreground[0]
    index = np.argmax(np.stack(foreground) * np.stack(importance), axis=0)
    return np.where(valid, np.asarray(keys)[index], 0)


def np_argmax_labels(probs, present):
    keys = [0] + [c + 1 for c in np.flatnonzero(present)]
    return np.asarray(keys)[np.argmax(probs[keys], axis=0)]


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


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def present():
    return np.array([True, False, True, True])


@pytest.fixture
def valid():
    mask = np.ones((H, W), bool)
    mask[9:, :] = False  # bottom padding
    mask[:, 8:] = False  # right padding
    return mask


def random_cams(rng):
    """Raw CAM-like maps: non-negative, a bright blob per class plus noise."""
    yy, xx = np.mgrid[:H, :W]
    cams = []
    for _ in range(C):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 20))
        cams.append(rng.uniform(0.5, 3.0) * blob + 0.2 * rng.random((H, W)))
    return np.stack(cams).astype(np.float32)


def random_normalized(rng, present, valid):
    return np_normalize(random_cams(rng), present, valid, False).astype(np.float32)


def full_valid():
    return np.ones((H, W), bool)


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("official_quirk", [False, True])
@pytest.mark.parametrize("use_valid", [False, True])
def test_normalize_matches_numpy(rng, present, valid, official_quirk, use_valid):
    cams = random_cams(rng) - 0.3  # some negative values, min != 0
    mask = valid if use_valid else full_valid()
    got = cvs.normalize(cams, present, mask if use_valid else None, official_quirk=official_quirk)
    want = np_normalize(cams, present, mask, official_quirk)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[~present] == 0)
    assert np.all(np.asarray(got)[:, ~mask] == 0)


def test_normalize_quirk_zeroes_before_shift(present):
    cams = np.full((C, H, W), 2.0, np.float32)
    cams[:, 0, 0] = 1.0  # the minimum
    cams[:, 1, 1] = 3.0  # the maximum
    plain = np.asarray(cvs.normalize(cams, present))
    quirk = np.asarray(cvs.normalize(cams, present, official_quirk=True))
    assert plain[0, 0, 0] == 0 and quirk[0, 0, 0] == pytest.approx(-1.0 / (2.0 + 1e-5), rel=1e-6)
    np.testing.assert_allclose(plain[0, 1:], quirk[0, 1:])


def test_normalize_constant_cam_and_empty_label(present):
    cams = np.full((C, H, W), 0.7, np.float32)
    assert np.all(np.asarray(cvs.normalize(cams, present)) == 0)
    quirk = np.asarray(cvs.normalize(cams, present, official_quirk=True))
    np.testing.assert_allclose(quirk, np_normalize(cams, present, full_valid(), True), rtol=1e-5)
    assert np.all(np.isfinite(quirk))
    empty = np.zeros(C, bool)
    assert np.all(np.asarray(cvs.normalize(cams, empty)) == 0)
    assert np.all(np.asarray(cvs.normalize(cams, present, np.zeros((H, W), bool))) == 0)


def test_normalize_cams_whose_range_overflows_float32(present):
    """Finite CAM values near +-3e38 (their range overflows float32) normalise to [0, 1], not
    to an all-zero map (which made an all-background pseudo-mask); other classes unchanged."""
    cams = np.asarray(np.random.default_rng(0).uniform(0, 5, (C, H, W)), np.float32)
    cams[0, :, : W // 2], cams[0, :, W // 2:] = -3e38, 3e38
    cams[0, 0, 0] = 0.0
    out = np.asarray(cvs.normalize(cams, np.ones(C, bool)))
    assert np.all(np.isfinite(out)) and out[0].min() == 0.0
    np.testing.assert_allclose(out[0, :, W // 2:], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(out[1:], np.asarray(cvs.normalize(cams[1:], np.ones(C - 1, bool))))


# ------------------------------------------------------------------------------ CoV and CVS

@pytest.mark.parametrize("use_valid", [False, True])
def test_cov_and_cvs_match_numpy(rng, present, valid, use_valid):
    mask = valid if use_valid else full_valid()
    x = random_normalized(rng, present, mask)
    arg = mask if use_valid else None
    np.testing.assert_allclose(
        np.asarray(cvs.coefficient_of_variation(x, present, T, arg)),
        np_cov(x, present, T, mask), rtol=1e-5, atol=1e-7)
    got = np.asarray(cvs.cvs(x, present, T, S, arg))
    np.testing.assert_allclose(got, np_cvs(x, present, T, S, mask), rtol=1e-5, atol=1e-6)
    assert np.all(got[:, ~mask] == 0)


def test_cov_edge_cases(present):
    x = np.zeros((C, H, W), np.float32)
    x[0] = 0.04            # no pixel above t
    x[2] = 0.5             # constant above t: std 0
    x[3, :2] = [[0.2], [0.6]]  # two values above t
    x[1] = np.linspace(0, 1, H * W).reshape(H, W)  # absent
    cov = np.asarray(cvs.coefficient_of_variation(x, present, T))
    want = [0.0, 0.0, 0.0, 0.2 / (0.4 + 1e-8)]
    np.testing.assert_allclose(cov, want, rtol=1e-5)
    # CVS: no pixel above t -> all zero; constant -> exponent 1 (unchanged).
    smoothed = np.asarray(cvs.cvs(x, present, T, S))
    assert np.all(smoothed[0] == 0) and np.all(smoothed[1] == 0)
    np.testing.assert_allclose(smoothed[2], 0.5)


def test_cvs_threshold_is_inclusive_and_gradient_finite(rng, present):
    x = random_normalized(rng, present, full_valid())
    x[0, 0, :3] = [T, 0.0, T - 1e-3]
    out = np.asarray(cvs.cvs(x, present, T, S))
    assert out[0, 0, 0] > 0 and out[0, 0, 1] == 0 and out[0, 0, 2] == 0
    grad_fn = jax.jit(jax.grad(lambda v: jnp.sum(cvs.cvs(v, present, T, S))))
    assert np.all(np.isfinite(np.asarray(grad_fn(x))))
    const = np.full((C, H, W), 0.5, np.float32)  # std 0: sqrt'(0) must not leak
    assert np.all(np.isfinite(np.asarray(grad_fn(const))))


def test_cvs_large_scale_stays_finite(rng, present):
    x = random_normalized(rng, present, full_valid())
    scale = 5.0
    assert np.any(1 - scale * np_cov(x, present, T, full_valid())[present] < 0)
    out = np.asarray(cvs.cvs(x, present, T, scale))  # a negative exponent: 0 ** p = inf
    assert np.all(np.isfinite(out)) and np.all(out[x < T] == 0)


# ------------------------------------------------------------------------ CRF input builders

def test_binary_probs_matches_numpy(rng, present):
    x_s = np.asarray(cvs.cvs(random_normalized(rng, present, full_valid()), present, T, S))
    got = np.asarray(ppmg.binary_probs(x_s, ALPHA))
    assert got.shape == (C, 2, H, W)
    np.testing.assert_allclose(got, np_binary_probs(x_s, ALPHA), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("label_set", [[True, False, True, True], [False, True, False, False],
                                       [False] * C])
def test_baseline_probs_matches_numpy(rng, label_set):
    present = np.array(label_set)
    x = random_normalized(rng, present, full_valid())
    got = np.asarray(ppmg.baseline_probs(x, present, ALPHA))
    assert got.shape == (C + 1, H, W)
    np.testing.assert_allclose(got, np_baseline_probs(x, present, ALPHA), rtol=1e-5, atol=1e-7)


def test_baseline_probs_ignores_absent_classes(rng, present):
    x = random_normalized(rng, present, full_valid())
    x[1] = 1.0  # absent class with maximal score must not lower the background
    got = np.asarray(ppmg.baseline_probs(x, present, ALPHA))
    np.testing.assert_allclose(got[0], np.power(1 - x[present].max(0), ALPHA), rtol=1e-5,
                               atol=1e-7)
    assert np.all(got[2] == 0)


# -------------------------------------------------------------------------- proportion, PPMG

def random_fg(rng, x):
    return (x > 0.3) | (rng.random(x.shape) < 0.1)


@pytest.mark.parametrize("use_valid", [False, True])
def test_proportion_matches_numpy(rng, present, valid, use_valid):
    mask = valid if use_valid else full_valid()
    x = random_normalized(rng, present, mask)
    fg = random_fg(rng, x)
    got = np.asarray(ppmg.proportion(x, fg, mask if use_valid else None))
    np.testing.assert_allclose(got, np_proportion(x, fg, mask), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_ppmg_matches_official_loop(present, valid, use_valid, seed):
    rng = np.random.default_rng(seed)
    mask = valid if use_valid else full_valid()
    x = random_normalized(rng, present, mask)
    fg = random_fg(rng, x)
    got = np.asarray(ppmg.ppmg_labels(x, fg, present, mask if use_valid else None))
    assert got.dtype == np.int32 and got.shape == (H, W)
    np.testing.assert_array_equal(got, np_ppmg(x, fg, present, mask))


def test_ppmg_edge_cases(present):
    x = np.zeros((C, H, W), np.float32)
    fg = np.zeros((C, H, W), bool)
    # pixel (0,0): classes 0 and 2 tie exactly -> lower index (label 1).
    x[0, 0, 0] = x[2, 0, 0] = 0.5
    fg[0, 0, 0] = fg[2, 0, 0] = True
    # pixel (1,1): foreground with x = 0 -> background; (1,2): foreground with x < 0 (quirk).
    fg[3, 1, 1] = True
    x[3, 1, 2], fg[3, 1, 2] = -0.2, True
    # pixel (2,2): absent class 1 with a huge score never wins; nobody else claims it.
    x[1, 2, 2], fg[1, 2, 2] = 1.0, True
    # pixel (3,3): only class 3 claims it.
    x[3, 3, 3], fg[3, 3, 3] = 0.9, True
    got = np.asarray(ppmg.ppmg_labels(x, fg, present))
    np.testing.assert_array_equal(got, np_ppmg(x, fg, present, full_valid()))
    assert got[0, 0] == 1 and got[1, 1] == 0 and got[1, 2] == 0 and got[2, 2] == 0
    assert got[3, 3] == 4 and np.count_nonzero(got) == 2
    # An empty label set gives all background whatever the inputs.
    assert np.all(np.asarray(ppmg.ppmg_labels(x, fg, np.zeros(C, bool))) == 0)


def test_ppmg_proportion_prefers_small_object(present):
    """A pixel claimed by a big, bright class and a small, dimmer one goes to the small one."""
    x = np.zeros((C, H, W), np.float32)
    fg = np.zeros((C, H, W), bool)
    x[0], fg[0] = 0.9, True                   # class 0 everywhere
    x[2, :2, :2], fg[2, :2, :2] = 0.6, True   # class 2 on a 2x2 patch
    got = np.asarray(ppmg.ppmg_labels(x, fg, present))
    assert np.all(got[:2, :2] == 3) and np.all(got[2:] == 1)


# ---------------------------------------------------------------------------- argmax labels

@pytest.mark.parametrize("label_set", [[True, False, True, True], [False] * C])
def test_argmax_labels_matches_numpy(rng, label_set):
    present = np.array(label_set)
    probs = rng.random((C + 1, H, W)).astype(np.float32)
    probs[1] += 1.0  # absent class 0-based 1 (label 2) would win everywhere if allowed
    probs[3, 0, 0] = probs[4, 0, 0] = 5.0  # tie between labels 3 and 4 -> 3
    got = np.asarray(ppmg.argmax_labels(probs, present))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np_argmax_labels(probs, present))
    if present.any():
        assert got[0, 0] == 3 and not np.any(got == 2)
    else:
        assert np.all(got == 0)


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


def test_core_functions_compose_under_jit_and_vmap(rng, present):
    """One jitted, vmapped pipeline over a batch of images, as the pseudo-mask stage may use."""
    cams = np.stack([random_cams(rng) for _ in range(3)])
    labels = np.stack([present, ~present, np.zeros(C, bool)])

    @jax.jit
    def pipeline(c, p):
        x = cvs.normalize(c, p)
        x_s = cvs.cvs(x, p, T, S)
        return ppmg.ppmg_labels(x, x_s > 0.5, p), ppmg.binary_probs(x_s, ALPHA)

    masks, probs = jax.vmap(pipeline)(cams, labels)
    assert masks.shape == (3, H, W) and probs.shape == (3, C, 2, H, W)
    for i in range(3):
        x = np_normalize(cams[i], labels[i], full_valid(), False)
        x_s = np_cvs(x.astype(np.float32), labels[i], T, S, full_valid())
        np.testing.assert_array_equal(np.asarray(masks[i]),
                                      np_ppmg(x, x_s > 0.5, labels[i], full_valid()))
