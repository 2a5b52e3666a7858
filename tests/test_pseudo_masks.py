"""pmm_jax.pseudo_masks: the pooled, jitted pipeline against a plain transcription of the
official per-image loop (synthetic and real VOC images), resuming, sharding, bad inputs, CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from pmm_jax import pseudo_masks
from pmm_jax.cams import multicrop_tiling
from pmm_jax.files import safe_io
from pmm_jax.masks import dense_crf
from pmm_jax.masks import generator as pm
from tests.support.hostile_files import hostile_npy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 21
# Pixels on which the pool must agree with the official loop (float32 jnp vs numpy).
AGREEMENT = 0.999


# ------------------------------------------------------------------------------------------
# A direct numpy transcription of the official loop (Eli-YiLi/PMM refine_cam.py), per image.


def official_normalize(v):
    v = v.astype(np.float64)
    return (v - v.min()) / (v.max() - v.min() + 1e-5)


def official_cov(v, t, s):
    above = v[v > t]
    return 0.0 if above.size == 0 else above.std() / (above + 1e-8).mean() * s


def official_mask(image, cams, cfg):
    """What the official code writes for one image, for any of the four variants."""
    params = dense_crf.backend_and_params(cfg.crf)[1]
    height, width = image.shape[:2]
    keys = sorted(cams)
    norm = {k: official_normalize(cams[k]) for k in keys}
    smooth = cfg.method in ("ppmg", "crf_cvs")
    xs = {k: np.where(v < cfg.t, 0, v) ** (1 - official_cov(v, cfg.t, cfg.s)) if smooth else v
          for k, v in norm.items()}
    if cfg.method in ("baseline", "crf_cvs"):
        v = np.stack([xs[k] for k in keys])
        bg = (1 - v.max(axis=0, keepdims=True)) ** cfg.alpha
        posterior = dense_crf.dense_crf(image, np.concatenate([bg, v]).astype(np.float32), params)
        return np.asarray([0] + [k + 1 for k in keys])[posterior.argmax(axis=0)]
    foreground = [np.ones((height, width))]
    importance = [foreground[0]]
    labels = [0]
    for k in keys:
        probs = np.stack([(1 - xs[k]) ** cfg.alpha, xs[k]]).astype(np.float32)
        fg = (dense_crf.dense_crf(image, probs, params)[1] > 0.5).astype(np.float64)
        foreground.append(fg)
        importance.append(norm[k] / (1 + (norm[k] * fg).sum()))
        labels.append(k + 1)
        foreground[0] = foreground[0] * (fg == 0)
        importance[0] = foreground[0]
    return np.asarray(labels)[np.argmax(np.stack(foreground) * np.stack(importance), axis=0)]


# ------------------------------------------------------------------------------------------
# Inputs


def cams_from_labels(labels, rng, sigma):
    """Classifier-like CAMs: blurred class indicator, random strength, an off-centre peak,
    non-negative noise (a CAM is a ReLU output)."""
    height, width = labels.shape
    yy, xx = np.mgrid[:height, :width]
    cams = {}
    for c in np.unique(labels):
        if c in (0, 255):
            continue
        mask = (labels == c).astype(np.float64)
        cy, cx = [rng.choice(a[labels == c]) for a in (yy, xx)]
        peak = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.3 * max(height, width)) ** 2))
        cam = gaussian_filter(mask, sigma) * rng.uniform(0.5, 3.0) * (0.4 + peak)
        cam += np.abs(rng.normal(0, 0.03, cam.shape)) * gaussian_filter(mask, 3 * sigma)
        cams[int(c) - 1] = cam.astype(np.float32)
    return cams


def synthetic_sample(rng, height, width, classes):
    """Coloured rectangles and ellipses on a textured background, with their CAMs."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([60 + 40 * yy / height, 90 + 30 * xx / width, np.full((height, width), 120.0)], -1)
    image += rng.normal(0, 6, image.shape)
    labels = np.zeros((height, width), np.uint8)
    for i, c in enumerate(classes):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        ry, rx = rng.uniform(0.12, 0.3) * height, rng.uniform(0.12, 0.3) * width
        if i % 2:
            shape = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        else:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        labels[shape] = c + 1
        image[shape] = rng.uniform(0, 255, 3) + rng.normal(0, 6, (shape.sum(), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, labels, cams_from_labels(labels, rng, sigma=2.5)


@pytest.fixture(scope="module")
def synthetic_records():
    rng = np.random.default_rng(0)
    # Sizes below one 64 x 64 bucket exercise the padding; two classes each keep jit to one
    # compilation per variant.
    layout = [((64, 64), [3, 11]), ((56, 60), [14, 19]), ((48, 64), [0, 7]), ((40, 64), [5, 6])]
    records = []
    for i, (shape, classes) in enumerate(layout):
        image, _, cams = synthetic_sample(rng, *shape, classes)
        records.append((f"syn{i}", image, cams))
    return records


def config(method, **overrides):
    cfg = pm.default_config(method)
    cfg.alpha = 11.0  # the default (None: the method's own), explicit for official_mask
    cfg.update(overrides)
    return cfg


def agreement(out_dir, records, cfg):
    same = total = 0
    for image_id, image, cams in records:
        ours = safe_io.read_mask(os.path.join(out_dir, f"{image_id}.png"))
        official = official_mask(image, cams, cfg)
        same += np.count_nonzero(ours == official)
        total += ours.size
    return same / total


# ------------------------------------------------------------------------------------------
# Agreement with the official loop


@pytest.mark.parametrize("method", ["ppmg", "baseline", "crf_cvs", "ppmg_no_cvs"])
def test_pool_matches_official_loop_on_synthetic_images(tmp_path, synthetic_records, method):
    cfg = config(method)
    stats = pm.generate(synthetic_records, str(tmp_path), cfg, num_workers=2,
                        process_index=0, process_count=1)
    assert stats["written"] == len(synthetic_records) and stats["failed"] == 0
    assert agreement(str(tmp_path), synthetic_records, cfg) >= AGREEMENT
    # The masks are not trivial: every present class wins some pixels somewhere.
    values = set()
    for image_id, _, _ in synthetic_records:
        values |= set(np.unique(safe_io.read_mask(str(tmp_path / f"{image_id}.png"))).tolist())
    assert values > {0, 4, 12}


def voc_records(voc_samples_dir, image_ids, rng):
    """``(id, image, cams)`` records of real VOC photographs, with CAMs made from their labels."""
    records = []
    for image_id in image_ids:
        image = safe_io.read_image(str(voc_samples_dir / f"{image_id}.png"))
        labels = safe_io.read_mask(str(voc_samples_dir / f"{image_id}_label.png"))
        records.append((image_id, image, cams_from_labels(labels, rng, sigma=12)))
    return records


@pytest.mark.parametrize("method", ["ppmg", "baseline"])
def test_pool_matches_official_loop_on_voc_photographs(tmp_path, voc_samples_dir, method):
    rng = np.random.default_rng(1)
    records = voc_records(voc_samples_dir, ("2007_000129", "2007_000033"), rng)
    cfg = config(method)
    pm.generate(records, str(tmp_path), cfg, num_workers=2, process_index=0, process_count=1)
    assert agreement(str(tmp_path), records, cfg) >= AGREEMENT


# ------------------------------------------------------------------------------------------
# The jax CRF backend (cfg.crf.backend = "jax") against the default pydensecrf one

# The bar: masks from the two backends agree on at least this share of pixels.
BACKEND_AGREEMENT = 0.99


def with_backend(cfg, backend):
    cfg = cfg.copy_and_resolve_references()
    cfg.crf.backend = backend
    return cfg


def mask_agreement(dir_a, dir_b, records):
    """``{id: share of pixels where the two folders' masks agree}``."""
    shares = {}
    for image_id, _, _ in records:
        a, b = (safe_io.read_mask(os.path.join(d, f"{image_id}.png")) for d in (dir_a, dir_b))
        assert a.shape == b.shape
        shares[image_id] = np.count_nonzero(a == b) / a.size
    return shares


def test_jax_backend_agrees_with_pydensecrf_on_voc_photographs(tmp_path, voc_samples_dir):
    """The issue's end-to-end bar, through ``generate`` as the pseudo stage calls it: PPMG and
    baseline masks of two full-size VOC photographs with two classes each (one 512 x 384
    bucket and one test, so both images and variants share the jax lattice compilation)."""
    rng = np.random.default_rng(2)
    records = voc_records(voc_samples_dir, ("2007_000129", "2007_000847"), rng)
    for method in ("ppmg", "baseline"):
        for backend in dense_crf.BACKENDS:
            out = tmp_path / method / backend
            stats = pm.generate(records, str(out), with_backend(config(method), backend),
                                num_workers=2, process_index=0, process_count=1)
            assert stats["written"] == len(records) and stats["failed"] == 0
        shares = mask_agreement(str(tmp_path / method / "pydensecrf"),
                                str(tmp_path / method / "jax"), records)
        print(f"{method}: jax vs pydensecrf pixel agreement {shares}")
        assert min(shares.values()) >= BACKEND_AGREEMENT, (method, shares)
        for image_id, _, _ in records:  # non-trivial masks: some foreground in each
            assert safe_io.read_mask(str(tmp_path / method / "jax" / f"{image_id}.png")).any()


def test_pseudo_stage_honours_config_crf_backend_override(tmp_path, synthetic_records,
                                                         monkeypatch):
    """``--config.crf.backend=jax`` on the (locked) demo config reaches the stage's generate
    config, which then runs the device path in this process (the two images of one shape
    bucket in one batch) and no process pool."""
    from absl import flags
    from ml_collections import config_flags

    from pmm_jax.masks import dense_crf_jax
    from pmm_jax.stages import pseudo

    argv = ["main", f"--config={REPO}/configs/demo.py:tiny", "--config.crf.backend=jax"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.crf.backend == "jax"
    cfg = pseudo.variant_config(config, "ppmg", 6)
    assert cfg.crf.backend == "jax" and cfg.crf.iterations == config.pseudo.crf.iterations
    with config.unlocked():
        config.crf.backend = "densecrf"
    with pytest.raises(ValueError, match=r"crf\.backend='densecrf'.*'pydensecrf', 'jax'"):
        pseudo.variant_config(config, "ppmg", 6)

    calls = []
    real = dense_crf_jax.sized_batch_lattices

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def no_pool(*args, **kwargs):
        raise AssertionError("the jax backend must not start a CRF process pool")

    monkeypatch.setattr(dense_crf_jax, "sized_batch_lattices", counting)
    monkeypatch.setattr(pm, "process_pool", no_pool)
    # The demo data set has 5 foreground classes: renumber each image's two classes 0, 1.
    records = [(image_id, image, dict(enumerate(cams[c] for c in sorted(cams))))
               for image_id, image, cams in synthetic_records[:2]]
    cfg.device_batch = 2
    stats = pm.generate(records, str(tmp_path), cfg, process_index=0, process_count=1)
    assert stats["written"] == 2
    # One device call: both images (64 x 64 and 56 x 60) padded to one 64 x 64 batch.
    assert calls == [(2, 64, 64, 3)]
    assert agreement(str(tmp_path), records, cfg) >= AGREEMENT  # the official loop's masks


def test_unknown_crf_backend_is_rejected(tmp_path):
    with pytest.raises(ValueError,
                       match=r"crf\.backend='gpu'.*allowed values: 'pydensecrf', 'jax'"):
        pm.generate([], str(tmp_path), with_backend(config("ppmg"), "gpu"))


# ------------------------------------------------------------------------------------------
# Resuming and sharding


def test_existing_masks_are_skipped_and_kept(tmp_path, synthetic_records):
    marker = np.full(synthetic_records[1][1].shape[:2], 7, np.uint8)
    safe_io.write_mask(str(tmp_path / "syn1.png"), marker)
    stats = pm.generate(synthetic_records[:2], str(tmp_path), config("ppmg"), num_workers=1,
                        process_index=0, process_count=1)
    assert (stats["written"], stats["skipped"]) == (1, 1)
    np.testing.assert_array_equal(safe_io.read_mask(str(tmp_path / "syn1.png")), marker)


def test_interrupted_run_completes_on_rerun(tmp_path, synthetic_records):
    records = [(f"r{i}", image, cams) for i, (_, image, cams) in enumerate(synthetic_records * 2)]

    def interrupted():
        for i, record in enumerate(records):
            if i == 5:
                raise KeyboardInterrupt
            yield record

    with pytest.raises(KeyboardInterrupt):
        pm.generate(interrupted(), str(tmp_path), config("ppmg"), num_workers=1,
                    process_index=0, process_count=1)
    done = sorted(os.listdir(tmp_path))
    assert 0 < len(done) < len(records)
    assert all(name.endswith(".png") and not name.startswith(".tmp") for name in done)
    stats = pm.generate(records, str(tmp_path), config("ppmg"), num_workers=1,
                        process_index=0, process_count=1)
    assert stats["skipped"] == len(done)
    assert stats["written"] == len(records) - len(done)
    assert sorted(os.listdir(tmp_path)) == sorted(f"{i}.png" for i, _, _ in records)


def test_processes_split_ids_disjointly(tmp_path):
    # Empty CAM dicts need no CRF, so this exercises only the bookkeeping.
    records = [(f"id{i:02d}", np.zeros((8, 8, 3), np.uint8), {}) for i in range(11)]
    seen = []
    for index in range(3):
        before = set(os.listdir(tmp_path))
        stats = pm.generate(records, str(tmp_path), config("ppmg"), num_workers=1,
                            process_index=index, process_count=3)
        mine = set(os.listdir(tmp_path)) - before
        assert mine == {f"{i}.png" for i, _, _ in records[index::3]}
        assert stats["written"] == len(mine)
        seen.append(mine)
    assert set.union(*seen) == {f"{i}.png" for i, _, _ in records}
    # Defaults come from JAX (one process here): everything is already done.
    assert pm.generate(records, str(tmp_path), config("ppmg"), num_workers=1)["skipped"] == 11
    with pytest.raises(ValueError, match="process_index 3"):
        pm.generate(records, str(tmp_path), config("ppmg"), process_index=3, process_count=3)


def test_empty_cam_dict_gives_all_background(tmp_path):
    stats = pm.generate([("empty", np.zeros((9, 13, 3), np.uint8), {})], str(tmp_path),
                        config("baseline"), num_workers=1, process_index=0, process_count=1)
    assert stats["written"] == 1
    mask = safe_io.read_mask(str(tmp_path / "empty.png"))
    assert mask.shape == (9, 13) and not mask.any()


# ------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_are_reported_by_file_and_the_rest_is_written(tmp_path, synthetic_records):
    _, image, cams = synthetic_records[0]
    shape = image.shape[:2]
    images, cam_dir = tmp_path / "images", tmp_path / "cams"
    images.mkdir()
    cam_dir.mkdir()
    safe_io.write_image(str(images / "good.png"), image)
    (images / "broken.png").write_bytes(b"not a png")
    (cam_dir / "garbled.npy").write_bytes(b"\x93NUMPY garbage")
    cam_files = {
        "good": cams,
        "nan": {3: np.where(np.arange(shape[1]) == 2, np.nan, 0.5) * np.ones(shape)},
        "small": {3: np.ones((shape[0] - 1, shape[1]))},
        "class": {20: np.ones(shape)},
        "negative": {-1: np.ones(shape)},
        "broken": {3: np.ones(shape)},
    }
    for name, value in cam_files.items():
        safe_io.write_cams(str(cam_dir / f"{name}.npy"), value)
    records = [(name, str(images / ("broken.png" if name == "broken" else "good.png")),
                str(cam_dir / f"{name}.npy")) for name in cam_files]
    records.append(("garbled", str(images / "good.png"), str(cam_dir / "garbled.npy")))
    records.append(("orphan", None, {3: np.ones(shape)}))
    records.append(("array", image, {3: np.full(shape, np.inf)}))
    records.append(("boolean", image, {True: np.ones(shape)}))
    # Any exception while preparing a record fails only that image (here an IndexError).
    records.append(("index", image, IndexErrorCams({3: np.ones(shape)})))

    with pytest.raises(pm.PseudoMaskError) as caught:
        pm.generate(records, str(tmp_path / "out"), config("ppmg"), num_workers=1,
                    process_index=0, process_count=1)
    err = caught.value
    assert sorted(i for i, _ in err.failures) == sorted(
        ["nan", "small", "class", "negative", "broken", "garbled", "orphan", "array", "boolean",
         "index"])
    causes = dict(err.failures)
    for name in ("nan", "small", "class", "negative", "garbled"):
        assert str(cam_dir / f"{name}.npy") in causes[name], causes[name]
    assert "NaN/inf" in causes["nan"] and "NaN/inf" in causes["array"]
    assert "shape" in causes["small"]
    assert "class index 20 outside 0..19" in causes["class"]
    assert str(images / "broken.png") in causes["broken"]
    assert "cannot read" in causes["broken"] and "cannot read" in causes["garbled"]
    assert "no image" in causes["orphan"]
    assert "array" in str(err) and "nan" in str(err)
    assert "class index True" in causes["boolean"]
    assert causes["index"] == "IndexError: no CAM here"
    assert (err.stats["written"], err.stats["failed"]) == (1, 10)
    assert os.listdir(tmp_path / "out") == ["good.png"]


class IndexErrorCams(dict):
    """A CAM mapping whose lookup raises IndexError (as a bad record once did mid-run)."""

    def __getitem__(self, key):
        raise IndexError("no CAM here")


def test_unwritable_out_dir_is_an_error_before_any_work(tmp_path, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who can write anywhere) or
    a file in the way is a ValueError naming the folder."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=rf"out_dir {tmp_path / 'file'}: cannot write"):
        pm.generate([], str(tmp_path / "file"), config("ppmg"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pm.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"out_dir .*ro: cannot write .*Permission denied"):
        pm.generate([("x", None, {})], str(tmp_path / "ro"), config("ppmg"))


def test_invalid_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown pseudo-mask variant 'crf'; registered: 'ppmg', "):
        pm.generate([], str(tmp_path), config("crf"))
    cfg = config("ppmg")
    with cfg.unlocked():
        cfg.crf.bilateral_sxyz = 3.0
    with pytest.raises(ValueError, match="bilateral_sxyz"):
        pm.generate([], str(tmp_path), cfg)


# ------------------------------------------------------------------------------------------
# Rough masks (method "rough"): same pool, skipping and errors


def test_rough_masks_resume_and_name_missing_and_mismatched_cams(tmp_path):
    from tests.support.crf_scenes import square_image_and_cam

    image, cam = square_image_and_cam()
    cam_dir, out_dir = tmp_path / "cams", str(tmp_path / "rough")
    safe_io.write_cams(str(cam_dir / "a.npy"), {2: cam})
    safe_io.write_cams(str(cam_dir / "b.npy"), {0: cam[::-1]})
    examples = [{"id": "a", "image": image}, {"id": "b", "image": image[::-1]}]
    cfg = pm.default_config("rough")
    assert pm.settings_of(cfg).alpha == 24.0 and pm.settings_of(config("ppmg")).alpha == 11.0
    run = lambda examples: pm.generate(pm.dataset_records(examples, str(cam_dir)), out_dir, cfg,
                                       num_workers=2, process_index=0, process_count=1)
    assert run(examples)["written"] == 2
    masks = multicrop_tiling.read_rough_masks(os.path.join(out_dir, "a.png"), 5)
    assert sorted(masks) == [2] and masks[2][20, 22]
    assert run(examples)["skipped"] == 2
    with pytest.raises(FileNotFoundError, match=r"cams/c\.npy for training image 'c'"):
        run(examples + [{"id": "c", "image": image}])
    safe_io.write_cams(str(cam_dir / "d.npy"), {1: cam[:30]})
    with pytest.raises(pm.PseudoMaskError, match=r"d\.npy\) of class 1 has shape \(30, 40\), "
                       r"image is \(40, 40\)"):
        run([{"id": "d", "image": image}])


# ------------------------------------------------------------------------------------------
# Worker imports and the command line


def run_python(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_worker_side_imports_load_no_jax_and_define_no_flags():
    """A spawned CRF worker imports pmm_jax.masks.worker (the task) and, under the CLI,
    pmm_jax.pseudo_masks as __mp_main__: neither may pull in JAX or register absl flags."""
    code = ("import sys; import pmm_jax.masks.worker, pmm_jax.pseudo_masks; from absl import flags; "
            "assert 'jax' not in sys.modules, 'jax imported'; "
            "assert 'config' not in flags.FLAGS and 'cam_dir' not in flags.FLAGS")
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, synthetic_records):
    root = tmp_path_factory.mktemp("cli")
    (root / "images").mkdir()
    (root / "cams").mkdir()
    for n, (image_id, image, cams) in enumerate(synthetic_records[:3]):
        if n == 0:
            Image.fromarray(image).save(root / "images" / f"{image_id}.jpg", quality=95)
        else:
            safe_io.write_image(str(root / "images" / f"{image_id}.png"), image)
        if n == 2:
            classes = sorted(cams)
            np.savez(root / "cams" / f"{image_id}.npz", cams=np.stack([cams[c] for c in classes]),
                     classes=np.asarray(classes))
        else:
            safe_io.write_cams(str(root / "cams" / f"{image_id}.npy"), cams)
    return root


def test_cli_end_to_end_matches_generate(tmp_path, cli_inputs):
    out = tmp_path / "out"
    result = run_python("-m", "pmm_jax.pseudo_masks", f"--cam_dir={cli_inputs / 'cams'}",
                        f"--image_dir={cli_inputs / 'images'}", f"--out_dir={out}",
                        "--method=crf_cvs", "--num_workers=1", "--config.alpha=4",
                        "--config.crf.iterations=5")
    assert result.returncode == 0, result.stderr
    assert "written=3" in result.stdout
    cfg = config("crf_cvs", alpha=4.0)
    cfg.crf.iterations = 5
    records = pseudo_masks.list_records(str(cli_inputs / "cams"), str(cli_inputs / "images"))
    pm.generate(records, str(tmp_path / "direct"), cfg, num_workers=1, process_index=0,
                process_count=1)
    for image_id, _, _ in records:
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
        np.testing.assert_array_equal(
            safe_io.read_mask(str(out / f"{image_id}.png")),
            safe_io.read_mask(str(tmp_path / "direct" / f"{image_id}.png")))


def test_cli_takes_the_crf_backend_as_a_config_override(tmp_path, cli_inputs):
    """``--config.crf.backend`` exists in the CLI's config (as in pmm_jax.main's) and a bad
    value is refused by name before any work (and before JAX is imported)."""
    result = run_python("-m", "pmm_jax.pseudo_masks", f"--cam_dir={cli_inputs / 'cams'}",
                        f"--image_dir={cli_inputs / 'images'}", f"--out_dir={tmp_path / 'out'}",
                        "--config.crf.backend=cuda")
    assert result.returncode != 0
    assert "crf.backend='cuda'" in result.stderr and "'pydensecrf', 'jax'" in result.stderr
    assert pm.default_config().crf.backend == "pydensecrf"


def test_cli_refuses_hostile_and_malformed_cams_per_image_and_exits_1(tmp_path, cli_inputs):
    """Through the CLI: CAM payloads that would write a file (one unpickling to ``{}``), an
    ``.npz`` with more classes than CAMs and a string class key each fail their image only;
    the good image is written, the run ends with the failures and counts, status 1, and
    no traceback; no payload ran."""
    cam_dir, marker = tmp_path / "cams", tmp_path / "pwned"
    cam_dir.mkdir()
    good = sorted(os.listdir(cli_inputs / "cams"))[0]
    (cam_dir / good).write_bytes((cli_inputs / "cams" / good).read_bytes())
    good_id = os.path.splitext(good)[0]
    cams = safe_io.read_cams(str(cam_dir / good))
    hostile_npy(cam_dir / "evil.npy", marker, "system")
    hostile_npy(cam_dir / "empty.npy", marker, "empty")
    np.savez(cam_dir / "long.npz", cams=np.stack([cams[min(cams)]]), classes=np.array([0, 1]))
    np.save(cam_dir / "key7.npy", {"7": cams[min(cams)]}, allow_pickle=True)
    image = next(cli_inputs.glob(f"images/{good_id}.*"))
    (tmp_path / "images").mkdir()
    for image_id in (good_id, "evil", "empty", "long", "key7"):
        (tmp_path / "images" / f"{image_id}{image.suffix}").write_bytes(image.read_bytes())
    result = run_python("-m", "pmm_jax.pseudo_masks", f"--cam_dir={cam_dir}",
                        f"--image_dir={tmp_path / 'images'}", f"--out_dir={tmp_path / 'out'}",
                        "--num_workers=1", "--config.crf.iterations=2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "4 image(s) failed" in result.stderr and "written=1 skipped=0 failed=4" in result.stderr
    for name in ("evil.npy", "empty.npy"):
        assert f"{cam_dir / name}: cannot read (UnpicklingError: refused" in result.stderr
    assert f"{cam_dir / 'long.npz'}: 'cams' must be" in result.stderr
    assert f"{cam_dir / 'key7.npy'}: key '7'" in result.stderr
    assert os.listdir(tmp_path / "out") == [f"{good_id}.png"]
    assert not marker.exists()


def test_cli_missing_cam_dir_and_file_out_dir_are_one_line_errors(tmp_path, cli_inputs):
    base = ["-m", "pmm_jax.pseudo_masks", f"--image_dir={cli_inputs / 'images'}"]
    (tmp_path / "file").write_text("")
    for args, message in (
            ([f"--cam_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'out'}"],
             f"error: --cam_dir={tmp_path / 'nope'}: does not exist"),
            ([f"--cam_dir={cli_inputs / 'cams'}", f"--out_dir={tmp_path / 'file'}"],
             f"error: out_dir {tmp_path / 'file'}: cannot write pseudo-masks there")):
        result = run_python(*base, *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().startswith(message), result.stderr


def test_cli_rejects_unknown_overrides_and_orphan_cams(tmp_path, cli_inputs):
    base = ["-m", "pmm_jax.pseudo_masks", f"--cam_dir={cli_inputs / 'cams'}",
            f"--image_dir={cli_inputs / 'images'}", f"--out_dir={tmp_path / 'out'}"]
    result = run_python(*base, "--config.alfa=3")
    assert result.returncode != 0 and "alfa" in result.stderr
    safe_io.write_cams(str(tmp_path / "lonely.npy"), {0: np.ones((4, 4))})
    result = run_python(*base[:2], f"--cam_dir={tmp_path}", *base[3:])
    assert result.returncode != 0
    assert str(tmp_path / "lonely.npy") in result.stderr and "no image" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_takes_folders_or_a_run_and_rough_masks_through_folders(tmp_path, cli_inputs):
    """Without folders or a run (or with half of each) the CLI says which flags it needs;
    ``--method=rough`` from folders writes rough masks (values c+1, 0, 255)."""
    for args, message in (([], "give --cam_dir, --image_dir and --out_dir, or --run_config"),
                          ([f"--run_config={REPO}/configs/demo.py:tiny"],
                           "--run_config needs --workdir")):
        result = run_python("-m", "pmm_jax.pseudo_masks", *args)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    out = tmp_path / "rough"
    result = run_python("-m", "pmm_jax.pseudo_masks", f"--cam_dir={cli_inputs / 'cams'}",
                        f"--image_dir={cli_inputs / 'images'}", f"--out_dir={out}",
                        "--method=rough", "--num_workers=2", "--config.crf.iterations=3")
    assert result.returncode == 0 and "written=3" in result.stdout, result.stderr
    records = pseudo_masks.list_records(str(cli_inputs / "cams"), str(cli_inputs / "images"))
    for image_id, _, cam_path in records:
        values = set(np.unique(safe_io.read_mask(str(out / f"{image_id}.png"))).tolist())
        classes = {c + 1 for c in safe_io.read_cams(cam_path)}
        assert values <= {0, 255} | classes and values & classes, (image_id, values)
