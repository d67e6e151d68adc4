"""utils.demo_data: deterministic, valid YOLO labels, several classes, and data/demo.yaml points at
the dataset the generator writes."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from utils import demo_data
from utils.demo_data import CLASS_NAMES, ROOT, generate, main, write_repo_yaml
from utils.general import check_dataset

pytest.importorskip("skimage", reason="the demo data generator needs scikit-image (requirements.txt)")


def _digest(root):
    h = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*") if p.suffix in (".jpg", ".txt"))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest(), len(files)


def _labels(root):
    rows = []
    for f in sorted(Path(root).glob("labels/*/*.txt")):
        rows += [line.split() for line in f.read_text().splitlines()]
    return rows


def test_same_arguments_same_bytes(tmp_path):
    a = generate(tmp_path / "a", n_train=6, n_val=2, imgsz=64, seed=3)
    b = generate(tmp_path / "b", n_train=6, n_val=2, imgsz=64, seed=3)
    c = generate(tmp_path / "c", n_train=6, n_val=2, imgsz=64, seed=4)
    da, db, dc = _digest(a.parent), _digest(b.parent), _digest(c.parent)
    assert da == db and da[1] == 16  # 8 images + 8 label files
    assert dc[0] != da[0]  # another seed, another dataset
    # regenerating in place replaces the old files (and the stale label cache)
    (a.parent / "labels" / "train.cache").write_bytes(b"stale")
    generate(a.parent, n_train=6, n_val=2, imgsz=64, seed=3)
    assert _digest(a.parent) == da and not (a.parent / "labels" / "train.cache").exists()


def test_processes_do_not_change_the_data(tmp_path):
    # the pool is used from 64 images on; each image depends only on (seed, split, index)
    one = generate(tmp_path / "one", n_train=60, n_val=4, imgsz=48, workers=1)
    two = generate(tmp_path / "two", n_train=60, n_val=4, imgsz=48, workers=2)
    assert _digest(one.parent) == _digest(two.parent)


def test_labels_are_valid_yolo_boxes_of_several_classes(tmp_path):
    root = generate(tmp_path, n_train=24, n_val=4, imgsz=96).parent
    rows = _labels(root)
    assert len(rows) > 40
    arr = np.array(rows, dtype=float)
    assert arr.shape[1] == 5
    cls, xywh = arr[:, 0], arr[:, 1:]
    assert (cls == cls.round()).all() and cls.min() >= 0 and cls.max() < len(CLASS_NAMES)
    assert len(np.unique(cls)) >= 5
    assert (xywh[:, 2:] > 0).all() and (xywh <= 1).all()
    x1, x2 = xywh[:, 0] - xywh[:, 2] / 2, xywh[:, 0] + xywh[:, 2] / 2
    assert x1.min() >= -1e-5 and x2.max() <= 1 + 1e-5  # boxes inside the image
    assert (xywh[:, 2:].max(1) < 0.1).any()  # small objects exist
    assert len(list(root.glob("images/train/*.jpg"))) == 24 and len(list(root.glob("images/val/*.jpg"))) == 4
    d = yaml.safe_load((root / "data.yaml").read_text())
    assert Path(d["path"]) == root.resolve() and d["names"] == list(CLASS_NAMES) and d["nc"] == len(CLASS_NAMES)


def test_select_split_is_new_images_and_leaves_train_and_val_unchanged(tmp_path):
    """The selection split: images of their own (never the checkpoint's train images), in the yaml as
    `select:`; adding it changes no train or val byte (image i depends on (seed, split, i) only)."""
    plain = generate(tmp_path / "plain", n_train=4, n_val=2, imgsz=64, seed=3)
    with_select = generate(tmp_path / "sel", n_train=4, n_val=2, imgsz=64, seed=3, n_select=3)
    for split in ("train", "val"):
        assert _digest(plain.parent / "images" / split) == _digest(with_select.parent / "images" / split)
    d = check_dataset(with_select)
    assert d["select"] == str(with_select.parent / "images" / "select") and "select" not in yaml.safe_load(
        plain.read_text())
    select = {p.read_bytes() for p in Path(d["select"]).glob("*.jpg")}
    seen = {p.read_bytes() for p in with_select.parent.glob("images/[tv]*/*.jpg")}
    assert len(select) == 3 and not select & seen
    assert len(list((with_select.parent / "labels" / "select").glob("*.txt"))) == 3


def test_repo_yaml_points_at_datasets_demo(tmp_path, monkeypatch):
    d = yaml.safe_load((ROOT / "data" / "demo.yaml").read_text())
    assert d["path"] == "datasets/demo" and d["train"] == "images/train" and d["val"] == "images/val"
    assert d["select"] == "images/select" and demo_data.parse_opt([]).n_select == demo_data.N_SELECT > 0
    assert d["names"] == list(CLASS_NAMES) and d["nc"] == len(CLASS_NAMES)
    assert demo_data.parse_opt([]).out == "datasets/demo"
    # a relative `path` also resolves against the repository root, from any working directory
    monkeypatch.chdir(tmp_path)
    got = check_dataset({"path": "models", "train": "detect", "val": "detect", "names": ["a"]})
    assert got["train"] == str(ROOT / "models" / "detect")
    if (ROOT / "datasets" / "demo" / "images" / "val").is_dir():
        assert check_dataset(ROOT / "data" / "demo.yaml")["path"] == str(ROOT / "datasets" / "demo")


def test_write_repo_yaml_relative_inside_absolute_outside(tmp_path):
    inside, outside = tmp_path / "in.yaml", tmp_path / "out.yaml"
    write_repo_yaml(inside, ROOT / "datasets" / "somewhere", "header")
    write_repo_yaml(outside, tmp_path / "data", "header")
    assert yaml.safe_load(inside.read_text())["path"] == "datasets/somewhere"
    assert yaml.safe_load(outside.read_text())["path"] == (tmp_path / "data").resolve().as_posix()


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--n-train", "2", "--n-val", "1", "--imgsz", "64", "--data",
                 str(tmp_path / "demo.yaml")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "demo.yaml").read_text())["path"] == (tmp_path / "d").resolve().as_posix()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "e"), "--n-train", "-1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: argument --n-train")
    assert not (tmp_path / "e").exists()


def test_demo_py_remakes_an_old_or_partial_dataset(tmp_path, monkeypatch):
    """demo.py regenerates the demo data unless every split has its current size (N_TRAIN, N_VAL, N_SELECT)."""
    import demo

    monkeypatch.setattr(demo_data, "N_TRAIN", 3)
    monkeypatch.setattr(demo_data, "N_VAL", 2)
    monkeypatch.setattr(demo_data, "N_SELECT", 2)
    assert not demo._demo_data_complete(tmp_path)  # absent
    generate(tmp_path, n_train=3, n_val=2, imgsz=64)
    assert not demo._demo_data_complete(tmp_path)  # made before the selection split existed
    generate(tmp_path, n_train=3, n_val=2, imgsz=64, n_select=2)
    assert demo._demo_data_complete(tmp_path)
    monkeypatch.setattr(demo_data, "N_VAL", 4)  # an older, smaller val split
    assert not demo._demo_data_complete(tmp_path)
