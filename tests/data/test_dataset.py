"""``pmm_jax.data.dataset``: the dataset handle the stages read data through, on the tiny
synthetic dataset (generated when the handle is opened)."""

import numpy as np
import pytest

import configs
from pmm_jax.constants import SYNTHETIC_CLASSES
from pmm_jax.data import builder_base, dataset, mmseg_augment, multicrop_batches, pipeline
from pmm_jax.files.workdir import Workdir
from pmm_jax import scoring

NUM_TRAIN, NUM_VAL = 64, 32


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """``(config, data)``: configs/demo.py:tiny opened in a fresh workdir."""
    config = configs.get_config("demo", "tiny")
    root = str(tmp_path_factory.mktemp("run"))
    return config, dataset.open_dataset(config, Workdir(root))


def test_open_resolves_names_splits_and_classes_once(opened):
    config, data = opened
    assert data.name == "synthetic_wsss/tiny"
    assert data.data_dir.endswith("/tfds") and builder_base.prepare(data.name, data.data_dir)
    assert data.class_names == SYNTHETIC_CLASSES and data.class_names[0] == "background"
    assert (data.num_classes, data.num_foreground) == (6, 5) == (config.data.num_classes, 5)
    assert (data.train_split, data.val_split, data.eval_pad_to) == ("train", "val", None)
    assert data.has_split("train") and data.has_split("val")
    assert data.split_name("val") == "val" and data.split_name("val", subset=5) == "val[:5]"
    assert data.dataset_splits == ("train", "val")
    assert (data.num_examples("train"), data.num_examples("val")) == (NUM_TRAIN, NUM_VAL)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.split_name("test")


def test_a_dataset_without_val_says_so(opened):
    _, data = opened
    no_val = dataset.Dataset(data.name, data.data_dir, data.class_names, "train", None)
    assert not no_val.has_split("val")
    with pytest.raises(ValueError, match="synthetic_wsss/tiny has no val split"):
        no_val.split_name("val")


def test_unknown_kinds_and_unprepared_datasets_are_errors_naming_what_to_do(tmp_path):
    config = configs.get_config("demo", "tiny")
    config.data.name = "nosuch_wsss"
    with pytest.raises(ValueError, match=r"config\.data\.name='nosuch_wsss'.*registered: "
                                         r"'synthetic_wsss', 'voc2012_wsss', 'coco2014_wsss'"):
        dataset.open_dataset(config, Workdir(str(tmp_path)))
    voc = configs.get_config("voc")
    voc.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(builder_base.DatasetNotPreparedError, match="pmm_jax.data.prepare"):
        dataset.open_dataset(voc, Workdir(str(tmp_path)))


def test_ids_examples_and_selection_in_dataset_order(opened):
    _, data = opened
    ids = data.ids("val")
    assert ids == [f"val_{i:06d}" for i in range(NUM_VAL)]
    examples = list(data.examples("val", all_processes=True))
    assert [ex["id"] for ex in examples] == ids
    ex = examples[3]
    assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (48, 48) and ex["labels"].shape == (5,)
    assert [e["id"] for e in data.select("val", limit=2)] == ids[:2]
    chosen = data.select("val", ids=[ids[5], ids[1]])
    assert [e["id"] for e in chosen] == [ids[1], ids[5]]
    np.testing.assert_array_equal(chosen[1]["mask"], examples[5]["mask"])
    assert [e["id"] for e in data.dataset_split_examples("train")][:2] == ["train_000000",
                                                                          "train_000001"]


def test_eval_batches_and_their_count(opened, monkeypatch):
    _, data = opened
    batches = list(data.eval_batches("val", 12, "config.eval.batch_size"))
    assert len(batches) == data.num_eval_batches("val", 12, "config.eval.batch_size") == 3
    assert sum(int(b["valid"].sum()) for b in batches) == NUM_VAL
    subset = list(data.eval_batches("val", 4, "config.eval.batch_size", subset=5))
    assert [i.decode() for b in subset for i, ok in zip(b["id"], b["valid"]) if ok] == \
        data.ids("val")[:5]
    monkeypatch.setattr(dataset.jax, "process_count", lambda: 4)
    with pytest.raises(ValueError, match=r"config\.cam\.batch_size=6 must be divisible .* \(4\)"):
        data.num_eval_batches("val", 6, "config.cam.batch_size")


def test_miou_against_the_ground_truth(opened):
    config, data = opened
    masks = {ex["id"]: ex["mask"] for ex in data.examples("val", all_processes=True)}
    perfect = data.miou("val", lambda i: masks[i], rule=config.eval.rule)
    assert perfect["miou"] == pytest.approx(1.0)
    assert list(perfect["per_class"]) == list(SYNTHETIC_CLASSES)
    background = lambda i: np.zeros_like(masks[i])
    ids = list(masks)[:4]
    cm = sum(scoring.confusion_matrix(background(i), masks[i], 6) for i in ids)
    expected = scoring.iou_from_confusion(cm, rule=config.eval.rule)[1]
    got = data.miou("val", background, ids=ids, rule=config.eval.rule)
    assert got["miou"] == pytest.approx(float(expected)) and got["miou"] < 0.5
    train = data.miou("train", lambda i: np.zeros((48, 48), np.uint8), ids=["train_000000"],
                      rule=config.eval.rule, dataset_split="train")
    assert 0 < train["miou"] < 1


def test_train_batches_pass_the_seed_and_section_through(opened, monkeypatch):
    """Which ``pipeline`` function a section reaches, with the run's seed and ``start_step``
    passed on unchanged (the stream is seeded once; a resumed run skips, never reseeds), on
    the encoded train shard (decoded after skipping)."""
    _, data = opened
    config = configs.get_config("demo", "tiny")
    calls = []
    for module, fn in ((pipeline, "train_batches"), (mmseg_augment, "mmseg_train_batches"),
                       (multicrop_batches, "multicrop_train_batches")):
        monkeypatch.setattr(module, fn, lambda ds, fn=fn, **kw: calls.append((fn, kw)))
    monkeypatch.setattr(pipeline, "with_masks_from_dir",
                        lambda ds, mask_dir, **kw: calls.append(("masks", mask_dir)) or ds)
    data.train_batches(config.cls, "config.cls.batch_size", seed=3, start_step=8)
    fn, kw = calls.pop()
    assert fn == "train_batches" and (kw["seed"], kw["start_step"]) == (3, 8)
    assert kw["num_foreground"] == 5
    assert (kw["batch_size"], kw["crop_size"]) == (config.cls.batch_size, config.cls.crop_size)
    config.cls.multicrop.rough_masks = "/rough"
    data.train_batches(config.cls, "config.cls.batch_size", seed=3, start_step=0)
    fn, kw = calls.pop()
    assert fn == "multicrop_train_batches" and kw["rough_masks"] == "/rough" and kw["seed"] == 3
    config.seg.update(dict(augment="mmseg", img_scale=(64, 64), cat_max_ratio=0.75))
    data.train_batches(config.seg, "config.seg.batch_size", seed=0, start_step=4,
                       mask_dir="/masks", mask_producer="the 'pseudo' stage")
    assert calls[0] == ("masks", "/masks") and calls[1][0] == "mmseg_train_batches"
    assert (calls[1][1]["seed"], calls[1][1]["start_step"]) == (0, 4)
