"""``config_rules``: every shipped config passes; each bad setting is reported by key, all of
them in one paragraph, and ``main`` stops on them before any stage runs."""

from __future__ import annotations

import pytest

import configs
from pmm_jax import config_rules
from tests.support.commands import run_main


@pytest.mark.parametrize("name, variant", [
    ("demo", "tiny"), ("demo", None), ("voc", None), ("voc", "rehearsal"), ("coco", None),
    ("folder", None), ("folder", "tiny")])
def test_every_shipped_config_passes(name, variant):
    config = configs.get_config(name, variant)
    config.allow_random_init = True  # the paper configs need ImageNet weights (test_main)
    assert config_rules.problems(config) == []


@pytest.mark.parametrize("key, value, text", [
    ("eval.rule", "foo", "config.eval.rule='foo' is not one of the allowed values: 'mmseg', 'pmm'"),
    ("pseudo.alpha", -1.0, "config.pseudo.alpha=-1.0 must be a positive number"),
    ("pseudo.train_on", "ppm", "config.pseudo.train_on='ppm' is not a registered pseudo-mask "
     "variant (registered: 'ppmg', 'baseline', 'crf_cvs', 'ppmg_no_cvs', 'rough')"),
    ("seg.pus.mode", "clip", "config.seg.pus.mode='clip' is not one of"),
    ("cam.method", "grad", "config.cam.method='grad' is not one of"),
    ("compute_dtype", "fp16", "config.compute_dtype='fp16' is not one of"),
    ("cls.crop_size", 0, "config.cls.crop_size=0 must be a positive integer"),
    ("cls.scale_range", (1.2, 0.8), "must be (low, high) with low <= high"),
    ("seg.runs", ("ce", "focal"), "config.seg.runs=('ce', 'focal') has items that"),
    ("data.num_classes", 7, "dataset synthetic_wsss/tiny has 6 classes (background included): "
                            "set --config.data.num_classes=6"),
    ("data.name", "synthetic_wsss/huge", "config.data.name='synthetic_wsss/huge' is not a dataset"),
    ("data.name", "imagenet", "config.data.name='imagenet': unknown dataset kind 'imagenet'"),
    ("data.class_names", "", "config.data.name='synthetic_wsss/tiny' takes its classes from the "
                             "config: set config.data.class_names"),
    ("cam.multicrop.stride", 40, "config.cam.multicrop.stride=40 is larger than its crop=32"),
    ("cycle.source", "dice", "config.cycle.source='dice' is not one of config.seg.runs"),
])
def test_a_bad_setting_is_named_with_what_it_must_be(key, value, text):
    config = configs.get_config("demo", "tiny")
    section, _, name = key.rpartition(".")
    node = config
    for part in section.split(".") if section else ():
        node = node[part]
    node[name] = value
    with pytest.raises(config_rules.ConfigError) as err:
        config_rules.check(config)
    assert text in str(err.value), str(err.value)


def test_a_segmenter_starting_from_the_classifier_needs_the_same_backbone():
    config = configs.get_config("demo", "tiny")  # init_from_cls on
    config.seg.model.backbone = dict(config.seg.model.backbone.to_dict(), widths=(8, 16, 16, 64),
                                     frozen_stages=1)
    assert config_rules.problems(config) == [
        "config.seg.model.init_from_cls copies the classifier's backbone, but "
        "config.seg.model.backbone differs from config.cls.model.backbone in widths; make them "
        "equal or set init_from_cls=False"]
    config.seg.model.init_from_cls = False
    assert config_rules.problems(config) == []


def test_every_bad_key_is_reported_before_any_stage_runs(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'wd'}",
                    "--config.eval.rule=foo", "--config.cls.crop_size=0",
                    "--config.data.num_classes=7", timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("error: 4 config settings are wrong") and len(err.splitlines()) == 1, err
    for text in ("config.eval.rule='foo'", "config.cls.crop_size=0", "config.data.num_classes=7"):
        assert text in err
    assert not (tmp_path / "wd").exists(), "no stage may have started"


def test_batches_that_do_not_split_over_the_devices_are_refused_at_start_up():
    """Known once the processes have started, still before any stage: a global batch that
    does not split evenly over every device (eval's would otherwise fail after training)."""
    config = configs.get_config("demo", "tiny")
    assert config_rules.device_problems(config, processes=2, local_devices=4) == []
    config.eval.batch_size, config.cam.method = 12, "multicrop"
    config.cam.multicrop.tile_batch = 20
    found = config_rules.device_problems(config, processes=2, local_devices=4)
    assert [p.split("=")[0] for p in found] == ["config.eval.batch_size",
                                                "config.cam.multicrop.tile_batch"]
    assert "must be a multiple of 8 (4 local device(s) x 2 process(es))" in found[0]
    with pytest.raises(config_rules.ConfigError, match=r"^2 config settings are wrong"):
        config_rules.check_devices(config, processes=2, local_devices=4)



def test_a_negative_max_side_is_refused():
    config = configs.get_config("folder", "tiny")
    config.data.folder = "/somewhere"
    config.data.max_side = -3
    with pytest.raises(config_rules.ConfigError, match=r"config\.data\.max_side=-3 must be a "
                                                       "non-negative integer"):
        config_rules.check(config)
    config.data.max_side = 0  # keep the images' own size
    assert not [p for p in config_rules.problems(config) if "max_side" in p]


def test_split_names_the_dataset_lacks_are_refused_before_any_stage(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'wd'}",
                    "--config.data.train_split=nope", "--config.pseudo.eval_split=also",
                    timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]  # after tfds's progress bars (generating it)
    assert err.startswith("error: 2 config settings are wrong"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "config.data.train_split='nope' is not a split of dataset synthetic_wsss/tiny" in err
    assert "config.pseudo.eval_split='also'" in err
    assert not (tmp_path / "wd" / "stages").exists() and not (tmp_path / "wd" / "cls").exists()


def test_every_malformed_override_is_named_at_once(tmp_path):
    proc = run_main("--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'wd'}",
                    "--config.cls.lr=abc", "--config.seg.lr=xyz", "--config.seg.nope=1",
                    "--config.cls.num_steps=2")
    assert proc.returncode == 1
    assert "3 overrides are wrong" in proc.stderr, proc.stderr
    for text in ("--config.cls.lr=abc: could not convert", "--config.seg.lr=xyz: could not "
                 "convert", "--config.seg.nope: the config has no key 'nope'"):
        assert text in proc.stderr, proc.stderr
    assert "num_steps" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "wd").exists()
