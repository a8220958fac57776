"""Discovery, verification scan, class maps, splits and the data report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, class_image, make_split_root, tree_digest, write_class_folders
from imgcls.config import TrainConfig
from imgcls.data import prepare, prepare_eval, summarize_report
from imgcls.data.sources import FASHION_MNIST_DIR, discover, stratified_split
from imgcls.errors import ImgclsError


def test_split_root_maps_classes_from_train(split_root):
    d = prepare(TrainConfig(data=str(split_root)))
    assert d.classes == ["cat", "dog", "fox"]
    assert len(d.test) == 18 and len(d.train) + len(d.val) == 48
    assert d.img_size == 32
    assert d.train.images.dtype.is_floating_point is False and d.train.images.shape[1:] == (32, 32, 3)


def test_class_folders_get_a_seeded_stratified_split(tmp_path):
    write_class_folders(tmp_path, ["a", "b"], 20)
    d1 = prepare(TrainConfig(data=str(tmp_path), val_fraction=0.2, test_fraction=0.2))
    d2 = prepare(TrainConfig(data=str(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=7))  # training seed
    assert (len(d1.train), len(d1.val), len(d1.test)) == (24, 8, 8)
    assert d1.test.paths == d2.test.paths  # the split depends on split_seed only
    assert sorted(d1.test.labels.tolist()) == [0] * 4 + [1] * 4
    d3 = prepare(TrainConfig(data=str(tmp_path), val_fraction=0.2, test_fraction=0.2, split_seed=1))
    assert d3.test.paths != d1.test.paths


def test_stratified_split_keeps_one_in_train():
    parts = stratified_split(["a", "a", "b", "b", "b"], {"val": 0.5, "test": 0.5}, seed=0)
    for cls_rows in ([0, 1], [2, 3, 4]):
        assert any(r in parts["train"] for r in cls_rows)


def test_csv_with_splits_and_relative_paths(tmp_path):
    write_class_folders(tmp_path / "imgs", ["x", "y"], 10)
    rows = ["path,label,split"]
    for i, p in enumerate(sorted((tmp_path / "imgs").rglob("*.png"))):
        rows.append(f"imgs/{p.parent.name}/{p.name},{p.parent.name},{'test' if i % 5 == 0 else 'train'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    d = prepare(TrainConfig(data=str(tmp_path / "labels.csv")))
    assert d.classes == ["x", "y"] and len(d.test) == 4


def test_csv_path_escaping_the_root_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    class_image(0, 0).save(tmp_path / "outside.png")
    (tmp_path / "data" / "labels.csv").write_text("path,label\n../outside.png,a\n")
    with pytest.raises(ImgclsError, match="escapes the data root"):
        discover(str(tmp_path / "data" / "labels.csv"))
    # a link out of the root is the folder sources' policy: skipped and reported, not read
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "outside.png")
    class_image(0, 1).save(tmp_path / "data" / "in.png")
    (tmp_path / "data" / "labels.csv").write_text("path,label\nlink.png,a\nin.png,a\n")
    disc = discover(str(tmp_path / "data" / "labels.csv"))
    assert [Path(p).name for p in disc.pools["all"].paths] == ["in.png"]
    assert [(Path(s["path"]).name, "outside the data root" in s["reason"]) for s in disc.skipped] == [("link.png", True)]


def test_hidden_entries_ignored_and_other_extensions_counted(split_root):
    (split_root / "train" / ".ipynb_checkpoints").mkdir()
    class_image(0, 99).save(split_root / "train" / ".ipynb_checkpoints" / "x.png")
    (split_root / "train" / "cat" / "Thumbs.db").write_bytes(b"\x00" * 10)
    (split_root / "train" / "cat" / "notes.txt").write_text("hi")
    class_image(0, 98).save(split_root / "train" / "cat" / "UPPER.PNG")
    disc = discover(str(split_root))
    assert sorted(set(disc.pools["train"].labels)) == ["cat", "dog", "fox"]
    assert disc.ignored_by_extension == {".db": 1, ".txt": 1}
    assert any(p.endswith("UPPER.PNG") for p in disc.pools["train"].paths)


def test_empty_class_folder_is_named(split_root):
    (split_root / "train" / "empty_one").mkdir()
    with pytest.raises(ImgclsError, match="empty_one"):
        prepare(TrainConfig(data=str(split_root)))


def test_one_class_refused(tmp_path):
    write_class_folders(tmp_path, ["only"], 10)
    with pytest.raises(ImgclsError, match="at least two classes"):
        prepare(TrainConfig(data=str(tmp_path)))


def test_test_class_unknown_to_training(tmp_path):
    make_split_root(tmp_path)
    write_class_folders(tmp_path / "test", ["zebra"], 3)
    with pytest.raises(ImgclsError, match="zebra"):
        prepare(TrainConfig(data=str(tmp_path)))


def test_eval_maps_labels_by_name(tmp_path, split_root):
    # an evaluation folder with a subset of classes: indices must follow the model's map, not sorted folders
    other = write_class_folders(tmp_path / "other", ["dog", "fox"], 3)
    split, extra, _ = prepare_eval(str(other), classes=["cat", "dog", "fox"], img_size=32)
    assert sorted(set(split.labels.tolist())) == [1, 2] and extra is None
    with pytest.raises(ImgclsError, match="unknown to the model"):
        prepare_eval(str(other), classes=["cat", "dog"], img_size=32)


def test_exclude_classes(split_root):
    d = prepare(TrainConfig(data=str(split_root), exclude_classes=("dog",)))
    assert d.classes == ["cat", "fox"] and d.excluded_classes == ["dog"]
    assert len(d.excluded_test) == 6 and set(d.excluded_test.labels.tolist()) == {0}
    with pytest.raises(ImgclsError, match="unknown class"):
        prepare(TrainConfig(data=str(split_root), exclude_classes=("wolf",)))


def test_salted_data_set_reports_and_never_modifies(split_root):
    """A data set salted with every bad case: bad files skipped with reasons, odd files used, nothing written."""
    cat = split_root / "train" / "cat"
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("not an image")
    good = (cat / "cat_0.png").read_bytes()
    (cat / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (32, 32), (0, 200, 200, 0)).save(cat / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(cat / "deep.png")
    Image.new("RGBA", (32, 32), (255, 0, 0, 100)).save(cat / "alpha.png")
    Image.new("L", (32, 32), 90).save(cat / "gray.png")
    (split_root / "test" / "dog" / "dup.png").write_bytes(good)  # the same photo in train and test
    before = tree_digest(split_root)
    d = prepare(TrainConfig(data=str(split_root), max_bad_fraction=0.2))
    assert tree_digest(split_root) == before
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in d.report["skipped"]}
    assert set(reasons) == {"empty.jpg", "text.jpg", "truncated.png"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert {"CMYK", "RGBA", "L"} <= set(d.report["modes"]) and any(m.startswith("I") for m in d.report["modes"])
    dup = d.report["duplicates"]
    assert len(dup) == 1 and {f["split"] for f in dup[0]["files"]} >= {"test"}
    json.dumps(d.report)  # the report is plain data


def test_too_many_bad_files_is_an_error(split_root):
    for i in range(10):
        (split_root / "train" / "cat" / f"bad{i}.jpg").write_bytes(b"junk")
    with pytest.raises(ImgclsError, match="cannot be used"):
        prepare(TrainConfig(data=str(split_root)))


def test_eval_data_has_the_bad_file_limit_of_training(tmp_path):
    other = write_class_folders(tmp_path / "other", ["dog", "fox"], 3)
    for i in range(2):
        (other / "dog" / f"junk{i}.jpg").write_bytes(b"junk")  # 2 of 8 files
    with pytest.raises(ImgclsError, match=r"2 of 8 files in the data cannot be used \(25% > max_bad_fraction 5%\)"):
        prepare_eval(str(other), classes=["cat", "dog", "fox"], img_size=32)
    split, _, report = prepare_eval(str(other), classes=["cat", "dog", "fox"], img_size=32, max_bad=0.3)
    assert len(split) == 6 and sorted(s["path"].rsplit("/", 1)[-1] for s in report["skipped"]) == ["junk0.jpg", "junk1.jpg"]


def test_identical_images_under_two_labels_are_reported(split_root):
    same = (split_root / "train" / "cat" / "cat_0.png").read_bytes()
    (split_root / "train" / "dog" / "also_a_dog.png").write_bytes(same)  # the same bytes, labelled cat and dog
    d = prepare(TrainConfig(data=str(split_root)))
    conflicts = d.report["conflicting_labels"]
    assert len(conflicts) == 1 and {f["label"] for f in conflicts[0]["files"]} == {"cat", "dog"}
    assert "  warning: 1 identical image(s) carry different labels" in summarize_report(d.report)


def test_cache_is_reused_and_keyed_by_content(split_root, monkeypatch):
    prepare(TrainConfig(data=str(split_root)))
    import imgcls.data.cache as cache

    calls = []
    real = cache._decode_one
    monkeypatch.setattr(cache, "_decode_one", lambda p, *a: calls.append(p) or real(p, *a))
    prepare(TrainConfig(data=str(split_root)))
    assert calls == []  # unchanged files: nothing decoded again
    class_image(2, 77).save(split_root / "train" / "cat" / "cat_0.png")  # content changes
    d = prepare(TrainConfig(data=str(split_root)))
    assert len(calls) > 0 and len(d.train) + len(d.val) == 48


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    import imgcls.data.sources as sources

    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(ImgclsError, match="apt-get install -y dataset-fashion-mnist"):
        discover("fashion-mnist")


def test_missing_folder(tmp_path):
    with pytest.raises(ImgclsError, match="not found"):
        discover(str(tmp_path / "nope"))


@pytest.mark.skipif(not (SHARED / "train").is_dir(), reason="intel-scenes not present at ../shared/datasets (tests that need it skip)")
def test_intel_scenes_scan_finds_its_known_flaws():
    d = prepare(TrainConfig(data=str(SHARED)))
    assert d.classes == ["buildings", "forest", "glacier", "mountain", "sea", "street"]
    assert len(d.train) + len(d.val) == 7240 and len(d.test) == 1501 and d.img_size == 150
    # its README: a few identical photos under two labels (buildings and street)
    labels = {frozenset(f["label"] for f in c["files"]) for c in d.report["conflicting_labels"]}
    assert frozenset({"buildings", "street"}) in labels


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_builtin():
    d = prepare(TrainConfig(data="fashion-mnist", val_fraction=0.1))
    assert len(d.classes) == 10 and d.img_size == 28
    assert len(d.train) + len(d.val) == 60000 and len(d.test) == 10000
