"""pmm_jax/data/folder.py: reading, checking and building a folder of the user's tagged images."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

import configs
from pmm_jax.data import folder
from pmm_jax.data.folder import InputError


def make_folder(root: pathlib.Path, rows=None, classes=None, masks=None, sizes=None) -> pathlib.Path:
    """A small folder: images a (jpg), b (png), c (png); ``rows`` the labels.csv lines,
    ``classes`` classes.txt lines (None: none), ``masks`` ``{id: uint8 [H,W]}``."""
    sizes = sizes or {"a.jpg": (20, 24), "b.png": (16, 18), "c.png": (22, 20)}
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
    rows = rows if rows is not None else ["a,cat", "b,cat;dog", "c,"]
    (root / "labels.csv").write_text("\n".join(["id,labels", *rows]) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for image_id, mask in (masks or {}).items():
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{image_id}.png")
    return root


def mask_of(h, w, value=1):
    mask = np.zeros((h, w), np.uint8)
    mask[2:6, 3:8] = value
    mask[0] = 255
    return mask


def test_reads_classes_labels_and_default_splits(tmp_path):
    root = make_folder(tmp_path / "f", masks={"b": mask_of(16, 18, 2)})
    f = folder.read_folder(root)
    assert f.class_names == ("background", "cat", "dog")  # sorted union of labels.csv
    assert f.labels == {"a": (1,), "b": (1, 2), "c": ()}
    assert (f.train, f.val) == (("a", "c"), ("b",))  # masked images are val
    assert f.train_masked == ()


def test_classes_txt_fixes_the_order_and_lists_pick_splits(tmp_path):
    root = make_folder(tmp_path / "f", classes=["dog", "cat", "bird"],
                       masks={"b": mask_of(16, 18, 3)})
    (root / "val.txt").write_text("b\n")
    (root / "train.txt").write_text("a\nc\n")
    f = folder.read_folder(root)
    assert f.class_names == ("background", "dog", "cat", "bird")
    assert f.labels["b"] == (1, 2)
    assert (f.train, f.val) == (("a", "c"), ("b",))


def test_only_train_txt_puts_the_rest_in_val_and_masked_train_is_scored(tmp_path):
    root = make_folder(tmp_path / "f", masks={"a": mask_of(20, 24), "b": mask_of(16, 18)})
    (root / "train.txt").write_text("a\nc\n")
    f = folder.read_folder(root)
    assert (f.train, f.val, f.train_masked) == (("a", "c"), ("b",), ("a",))


@pytest.mark.parametrize("case, expected", [
    ("unknown class", r"labels\.csv line 3: class 'dog' of image 'b' is not in .*classes\.txt"),
    ("id without image", r"labels\.csv line 5: id 'd' has no image"),
    ("image without row", r"images/c\.png has no row in .*labels\.csv"),
    ("duplicate id", r"labels\.csv line 4: duplicate id 'a' \(also on line 2\)"),
    ("empty folder", r"is empty"),
    ("no images", r"images holds no .jpg, .jpeg or .png image: the folder is empty"),
])
def test_bad_lists_name_the_file_and_line(tmp_path, case, expected):
    root = tmp_path / "f"
    if case == "unknown class":
        make_folder(root, classes=["cat"])
    elif case == "id without image":
        make_folder(root, rows=["a,cat", "b,cat", "c,", "d,cat"])
    elif case == "image without row":
        make_folder(root, rows=["a,cat", "b,cat"])
    elif case == "duplicate id":
        make_folder(root, rows=["a,cat", "b,cat", "a,dog", "c,"])
    elif case == "empty folder":
        root.mkdir()
    elif case == "no images":
        (root / "images").mkdir(parents=True)
        (root / "labels.csv").write_text("id,labels\n")
    with pytest.raises(InputError, match=expected):
        folder.read_folder(root)


def test_undecodable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match=r"images/b\.png"):
        folder.decode_example(folder.read_folder(root), "b", 0)


def test_mask_value_that_is_no_class_is_named(tmp_path):
    root = make_folder(tmp_path / "f", masks={"b": mask_of(16, 18, 3)})
    with pytest.raises(InputError, match=r"masks/b\.png: .*mask values \[3\] outside 0\.\.2"):
        folder.decode_example(folder.read_folder(root), "b", 0)


def test_mask_of_another_size_is_named(tmp_path):
    root = make_folder(tmp_path / "f", masks={"b": mask_of(15, 18)})
    with pytest.raises(InputError, match=r"masks/b\.png: mask is 15x18 but its image .*b\.png "
                                         r"is 16x18"):
        folder.decode_example(folder.read_folder(root), "b", 0)


def test_examples_convert_modes_shrink_and_take_labels_from_the_csv(tmp_path):
    root = make_folder(tmp_path / "f", sizes={"a.jpg": (20, 24), "b.png": (16, 18), "c.png": (40, 10)},
                       masks={"c": mask_of(40, 10, 2)})
    Image.fromarray(np.zeros((16, 18, 4), np.uint8), "RGBA").save(root / "images" / "b.png")
    f = folder.read_folder(root)
    rgba = folder.decode_example(f, "b", 0)
    assert rgba["image"].shape == (16, 18, 3) and rgba["labels"].tolist() == [1.0, 1.0]
    shrunk = folder.decode_example(f, "c", 20)
    assert shrunk["image"].shape == (20, 5, 3)
    mask = np.asarray(Image.open(__import__("io").BytesIO(shrunk["mask"])))
    assert mask.shape == (20, 5) and set(np.unique(mask)) <= {0, 2, 255}
    assert shrunk["labels"].tolist() == [0.0, 0.0]  # c's row lists no class: labels.csv wins


def test_build_is_reused_until_the_folder_changes(tmp_path):
    root = make_folder(tmp_path / "f", masks={"b": mask_of(16, 18, 2)})
    data_dir = str(tmp_path / "tfds")
    first = folder.build(root, data_dir)
    assert first.splits == {"train": 2, "val": 1}
    assert first.eval_pad_to == (24, 24)  # the largest image, rounded up to multiples of 8
    assert folder.build(root, data_dir) == first
    (root / "labels.csv").write_text("id,labels\na,dog\nb,cat;dog\nc,\n")
    second = folder.build(root, data_dir)
    assert second.name != first.name
    assert sorted(os.listdir(tmp_path / "tfds" / "folder_wsss")) == sorted(
        [first.name.split("/")[1], second.name.split("/")[1]])


def test_main_stops_on_bad_input_with_one_paragraph_before_any_stage(tmp_path):
    import subprocess
    import sys

    root = make_folder(tmp_path / "f", classes=["cat"])  # b's 'dog' is not a class
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.main", "--config=configs/folder.py:tiny",
         f"--config.data.folder={root}", f"--workdir={workdir}"],
        cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "labels.csv line 3: class 'dog' of image 'b'" in proc.stderr
    assert not (workdir / "stages").exists()


def test_a_folder_without_masks_opens_without_val_and_without_a_pseudo_mask_score(tmp_path):
    from pmm_jax.data import dataset
    from pmm_jax.files.workdir import Workdir

    config = configs.get_config("folder", "tiny")
    config.data.folder = str(make_folder(tmp_path / "f"))
    data = dataset.open_dataset(config, Workdir(str(tmp_path / "run")))
    assert data.name.startswith("folder_wsss/") and data.num_classes == 3
    assert data.class_names == ("background", "cat", "dog")
    assert not data.has_split("val") and data.eval_pad_to == data.canvas == (24, 24)
    assert "train_masked" in data.optional_splits and "train_masked" not in data.dataset_splits
    assert data.miou("train", None, ids=[], rule="mmseg")["miou"] is None  # nothing scored
    config.data.folder = ""
    with pytest.raises(InputError, match="config.data.folder is empty"):
        dataset.open_dataset(config, Workdir(str(tmp_path / "run")))


def test_a_decompression_bomb_is_named_not_decoded(tmp_path):
    root = make_folder(tmp_path / "f")
    Image.new("1", (20000, 20000)).save(root / "images" / "b.png")
    assert (root / "images" / "b.png").stat().st_size < 100_000
    with pytest.raises(InputError, match=r"images/b\.png: refused to decode .*decompression bomb"):
        folder.decode_example(folder.read_folder(root), "b", 0)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_labels_csv_in_utf16_as_excel_saves_unicode_text_is_read(tmp_path, encoding):
    root = make_folder(tmp_path / "f")
    text = "id\tlabels\na\tcafé\nb\tcafé;dog\nc\t\n"
    data = text.encode(encoding)
    (root / "labels.csv").write_bytes(data if encoding == "utf-16" else b"\xfe\xff" + data)
    f = folder.read_folder(root)
    assert f.class_names == ("background", "café", "dog")
    assert f.labels == {"a": (1,), "b": (1, 2), "c": ()}


@pytest.mark.parametrize("name", ["labels.csv", "classes.txt", "train.txt"])
def test_a_text_file_in_windows_1252_is_named_with_its_line(tmp_path, name):
    root = make_folder(tmp_path / "f", rows=["a,cat", "b,caf\u00e9", "c,"],
                       classes=["cat", "caf\u00e9"])
    (root / "train.txt").write_text("a\nb\nc\n")
    path = root / name
    path.write_bytes(path.read_text().encode("cp1252"))
    line = {"labels.csv": 3, "classes.txt": 2, "train.txt": None}[name]
    if line is None:  # nothing but ASCII: cp1252 and UTF-8 agree
        folder.read_folder(root)
        path.write_bytes("a\nb\nr\u00e9sum\u00e9\n".encode("cp1252"))
        line = 3
    with pytest.raises(InputError, match=rf"{name} line {line}: byte 0xe9 is not UTF-8 .* save "
                                         "it as UTF-8"):
        folder.read_folder(root)


@pytest.mark.parametrize("kind", ["folder", "dangling link"])
def test_a_folder_or_dangling_link_named_like_an_image_is_named(tmp_path, kind):
    root = make_folder(tmp_path / "f")
    path = root / "images" / "album.jpg"
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "gone.jpg")
    what = "a folder" if kind == "folder" else "a link to nothing"
    with pytest.raises(InputError, match=rf"images/album\.jpg is {what} but is named like an image"):
        folder.read_folder(root)


def test_tags_that_differ_only_in_case_are_refused_unless_classes_txt_lists_both(tmp_path):
    root = make_folder(tmp_path / "f", rows=["a,Spot", "b,spot;dog", "c,"])
    with pytest.raises(InputError, match=r"labels\.csv line 3: class 'spot' differs from 'Spot' "
                                         r"\(line 2\) only in case"):
        folder.read_folder(root)
    (root / "classes.txt").write_text("Spot\nspot\ndog\n")
    assert folder.read_folder(root).class_names == ("background", "Spot", "spot", "dog")


def test_the_summary_says_what_was_built_and_which_images_are_unused(tmp_path):
    root = make_folder(tmp_path / "f", rows=["a,cat", "b,cat;dog", "c,", "d,dog", "e,"],
                       sizes={f"{i}.png": (16, 16) for i in "abcde"},
                       masks={"b": mask_of(16, 16, 2)}, classes=["cat", "dog", "bird"])
    (root / "train.txt").write_text("a\nc\n")
    (root / "val.txt").write_text("b\n")
    built = folder.build(root, str(tmp_path / "data"))
    text = folder.summary_text(built)
    assert "3 classes (images tagged): cat 2, dog 1, bird 0" in text, text
    assert "train 2 images (0 with a mask), val 1" in text
    assert "unused: 2 images in neither train.txt nor val.txt: d, e" in text
    assert "warning: no train or val image is tagged bird" in text


def test_main_shows_what_it_built_from_the_folder(tmp_path):
    """The summary is logged where ``main`` shows it (absl INFO is silenced there); a split
    name the built dataset lacks then stops the run before any stage."""
    import subprocess
    import sys

    root = make_folder(tmp_path / "f", rows=["a,cat", "b,cat;dog", "c,"])
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("\n")
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pmm_jax.main", "--config=configs/folder.py:tiny",
         f"--config.data.folder={root}", f"--workdir={workdir}", "--config.data.train_split=nope"],
        cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 classes (images tagged): cat 2, dog 1" in proc.stderr
    assert "train 2 images (0 with a mask), val 0" in proc.stderr
    assert "unused: 1 images in neither train.txt nor val.txt: c" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: config.data.train_split='nope' is not a split of dataset folder_wsss/")
    assert not (workdir / "stages").exists()
