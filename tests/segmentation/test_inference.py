"""Segmenter test-time pipeline: mmseg's sliding windows, scale/flip averaging, host CRF."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pmm_jax import models
from pmm_jax.files import safe_io
from pmm_jax.masks import dense_crf
from pmm_jax.segmentation import segmenter
from pmm_jax.segmentation import inference as si
from pmm_jax.training import trainer


def _mmseg_slide(apply, image, crop, stride):
    """numpy transcription of mmseg ``EncoderDecoder.slide_inference`` (NHWC, no rescale);
    ``apply`` returns logits at the window's size."""
    b, h_img, w_img, _ = image.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = None, np.zeros((b, h_img, w_img, 1))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * stride + crop, h_img), min(w_idx * stride + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out = np.asarray(apply(image[:, y1:y2, x1:x2]))
            if preds is None:
                preds = np.zeros((b, h_img, w_img, out.shape[-1]))
            preds[:, y1:y2, x1:x2] += out
            count[:, y1:y2, x1:x2] += 1
    assert count.min() > 0
    return preds / count


def _window_dependent(x):
    """Logits that depend on the whole window (its mean), so overlaps are visible."""
    return jnp.concatenate([x - x.mean(axis=(1, 2), keepdims=True), x[..., :1] * 2], axis=-1)


@pytest.mark.parametrize("size,crop,stride", [((37, 50), 16, 12), ((20, 9), 16, 12),
                                              ((896, 40), 512, 480)])
def test_slide_logits_match_mmseg(size, crop, stride):
    image = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    got = jax.jit(lambda x: si.slide_logits(_window_dependent, x, crop, stride))(image)
    np.testing.assert_allclose(np.asarray(got), _mmseg_slide(_window_dependent, image, crop, stride),
                               rtol=1e-5, atol=1e-5)


def test_window_starts():
    assert si.window_starts(896, 512, 480) == [0, 384]
    assert si.window_starts(512, 512, 480) == [0]
    assert si.window_starts(300, 512, 480) == [0]
    assert si.window_starts(1000, 512, 480) == [0, 480, 488]


def test_scale_flip_average_of_a_pointwise_net_is_its_softmax():
    """A per-pixel net is scale- and flip-equivariant on a constant image: every pass gives
    the same probabilities; on any image, scale 1 without flip is plain softmax."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
    apply = lambda x: x @ weights  # noqa: E731
    image = jnp.asarray(np.random.default_rng(2).normal(size=(1, 24, 20, 3)), jnp.float32)
    plain = si.averaged_probs(apply, image)
    np.testing.assert_allclose(plain, jax.nn.softmax(apply(image), -1), rtol=1e-6)
    constant = jnp.ones((1, 24, 20, 3)) * jnp.asarray([0.3, -1.0, 2.0])
    averaged = jax.jit(lambda x: si.averaged_probs(apply, x, scales=(0.5, 0.75, 1.25), flip=True,
                                                   sliding_window=(16, 12)))(constant)
    np.testing.assert_allclose(averaged, jax.nn.softmax(apply(constant), -1), rtol=1e-5)


def _tiny_segmenter():
    cfg = ml_collections.ConfigDict(dict(backbone=dict(models.TINY_RESNET), channels=8,
                                         aux_channels=4))
    model = models.build_segmenter(cfg, 4, models.init_rngs(0))
    model.eval()
    return model


def _batch(rng, size=(4, 28, 24)):
    """Four rows (one per virtual device), two of them smaller than the padded canvas."""
    raw = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return {"image": ((raw - 128.0) / 64).astype(np.float32), "raw": raw,
            "height": np.array([28, 21, 28, 17], np.int32),
            "width": np.array([24, 19, 13, 24], np.int32),
            "valid": np.array([True, True, True, False])}


def test_predictor_options_off_equals_argmax_and_crf_matches_host_loop():
    model = _tiny_segmenter()
    batch = _batch(np.random.default_rng(3))
    plain = si.Predictor(model, ml_collections.ConfigDict(dict(batch_size=4)))(batch)
    expected = trainer.make_predict_fn(model, segmenter.predict_labels)(batch)
    np.testing.assert_array_equal(plain, expected)

    predictor = si.Predictor(model, ml_collections.ConfigDict(dict(
        scales=(0.75, 1.0), flip=True, sliding_window=(24, 16), crf=True, crf_workers=2)))
    labels = predictor(batch)
    probs, finite = predictor._device(batch)  # the averaged probabilities the CRF starts from
    assert finite.all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    for i, (h, w) in enumerate(zip(batch["height"][:3], batch["width"][:3])):
        posterior = dense_crf.dense_crf(batch["raw"][i, :h, :w],
                                  probs[i, :h, :w].transpose(2, 0, 1).copy(),
                                  dense_crf.SEGMENTATION_TEST_CRF)
        np.testing.assert_array_equal(labels[i, :h, :w], posterior.argmax(0))
        assert not labels[i, h:].any() and not labels[i, :, w:].any()
    assert not labels[3].any()  # padding row: no CRF


def nan_weights(model):
    """``model`` with every parameter NaN (a diverged checkpoint)."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), params))
    return model


@pytest.mark.parametrize("use_crf", [False, True])
def test_predictor_refuses_non_finite_probabilities_naming_the_source(use_crf):
    model = nan_weights(_tiny_segmenter())
    batch = _batch(np.random.default_rng(4)) | {"id": np.array([b"a", b"b", b"c", b"pad"])}
    predictor = si.Predictor(model, ml_collections.ConfigDict(dict(crf=use_crf, crf_workers=1)),
                             crf_backend="jax", source="stage 'eval': segmenter 'pus'")
    with pytest.raises(safe_io.NonFiniteError, match=r"stage 'eval': segmenter 'pus': .*"
                       r"\['a', 'b', 'c'\] are not finite"):
        predictor(batch)


class _PixelNet(nnx.Module):
    """Logits = a fixed linear map of each pixel's colour: cheap to build and to compile."""

    def __init__(self, rng):
        self.w = nnx.Param(jnp.asarray(rng.normal(0, 2, (3, 4)), jnp.float32))

    def __call__(self, x):
        return {"logits": x @ self.w[...]}


def test_jax_crf_backend_agrees_with_pydensecrf():
    """``config.crf.backend = "jax"`` (through ``predictor``, as the seg/cycle/eval stages
    build it): crf_jax in this process gives the pydensecrf labels on >= 99 % of pixels."""
    rng = np.random.default_rng(4)
    # Colour blocks with mild noise (a photograph-like lattice size; random noise would make
    # the bilateral lattice, and its compilation, needlessly large).
    blocks = rng.integers(0, 256, (4, 4, 4, 3))
    raw = np.repeat(np.repeat(blocks, 7, axis=1), 6, axis=2)[:, :28, :24]
    raw = np.clip(raw + rng.integers(-1, 2, raw.shape), 0, 255).astype(np.uint8)
    batch = dict(_batch(rng), raw=raw, image=((raw - 128.0) / 64).astype(np.float32))
    eval_cfg = dict(crf=True, crf_workers=1)
    config = ml_collections.ConfigDict(dict(eval=eval_cfg, crf=dict(backend="jax")))
    model = _PixelNet(rng)
    predictor = si.predictor(model, config)
    assert predictor._backend == "jax" and predictor._pool is None
    ours = predictor(batch)
    probs, _ = predictor._device(batch)  # the averaged probabilities the CRF starts from
    same = total = 0
    for i, (h, w) in enumerate(zip(batch["height"][:3], batch["width"][:3])):
        reference = dense_crf.dense_crf(batch["raw"][i, :h, :w],
                                  probs[i, :h, :w].transpose(2, 0, 1).copy(),
                                  dense_crf.SEGMENTATION_TEST_CRF).argmax(0)
        same += np.count_nonzero(ours[i, :h, :w] == reference)
        total += h * w
        assert not ours[i, h:].any() and not ours[i, :, w:].any()
    print(f"test-time jax vs pydensecrf CRF label agreement {same / total:.6f}")
    assert same / total >= 0.99, same / total
    assert not ours[3].any()  # padding row: no CRF
    assert len(np.unique(ours[:3])) > 1  # not a constant map

    with config.unlocked():
        config.crf.backend = "pydensecrf "
    with pytest.raises(ValueError, match=r"crf\.backend='pydensecrf '.*'pydensecrf', 'jax'"):
        si.predictor(model, config)
    # A config without a crf section keeps the default.
    assert si.predictor(model, ml_collections.ConfigDict(dict(eval=eval_cfg)))._backend == \
        "pydensecrf"
