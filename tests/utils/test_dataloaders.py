"""utils.dataloaders on tiny generated data: bad files are skipped and counted, batches have the
documented shapes (mosaic / augmentation / rectangular val), the label cache is reused and renewed."""
import logging
import shutil

import numpy as np
import pytest
import torch

from utils import dataloaders
from utils.dataloaders import LoadImagesAndLabels, create_dataloader, parse_label_lines
from utils.demo_data import generate
from utils.general import LOGGER, UserError

HYP = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 5.0, "translate": 0.1, "scale": 0.5, "shear": 2.0,
       "perspective": 0.0, "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate(root, n_train=8, n_val=4, imgsz=96)
    return root


@pytest.fixture
def log_lines():
    """Lines logged by utils.general.LOGGER (it does not propagate to pytest's caplog)."""
    lines = []

    class _H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = _H(level=logging.DEBUG)
    LOGGER.addHandler(h)
    yield lines
    LOGGER.removeHandler(h)


def _copy_split(src, dst):
    shutil.copytree(src / "images" / "train", dst / "images" / "train")
    shutil.copytree(src / "labels" / "train", dst / "labels" / "train")
    return dst / "images" / "train"


def test_bad_files_are_skipped_and_counted(tiny, tmp_path, log_lines):
    images = _copy_split(tiny, tmp_path)
    labels = tmp_path / "labels" / "train"
    (images / "garbage.jpg").write_bytes(b"this is not an image")
    good = (images / "000000.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (labels / "truncated.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    first = labels / "000001.txt"
    n_good = len(first.read_text().split("\n")) - 1
    bad = ["7 0.5", "0 1.5 0.5 0.1 0.1", "a b c d e", "-1 0.5 0.5 0.1 0.1", "0 0.5 0.5 0 0.1", "0.5 0.5 0.5 0.1 0.1"]
    first.write_text(first.read_text() + "\n".join(bad) + "\n")

    ds = LoadImagesAndLabels(str(images), img_size=64, batch_size=4)
    assert ds.n == 8  # two corrupt images dropped, the run goes on
    assert not any("garbage" in f or "truncated" in f for f in ds.im_files)
    i = next(k for k, f in enumerate(ds.im_files) if f.endswith("000001.jpg"))
    assert len(ds.labels[i]) == n_good  # the good lines of a file with bad lines are kept
    warn = [m for m in log_lines if m.startswith("WARNING: skipped")]
    assert len(warn) == 1 and "2 corrupt images" in warn[0] and f"{len(bad)} bad label lines" in warn[0]
    # every remaining image loads and gives a valid sample
    im, targets, path, shapes = ds[i]
    assert im.dtype == torch.uint8 and im.shape == (3, 64, 64) and targets.shape == (n_good, 6)


def test_split_without_usable_images_is_a_user_error(tmp_path):
    images = tmp_path / "images" / "train"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (images / "b.png").write_bytes(b"")
    with pytest.raises(UserError, match="no usable images"):
        create_dataloader(str(images), 64, 2, 32, workers=0)
    empty = tmp_path / "empty" / "images"
    empty.mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        create_dataloader(str(empty), 64, 2, 32, workers=0)
    with pytest.raises(UserError, match="does not exist"):
        create_dataloader(str(tmp_path / "missing"), 64, 2, 32, workers=0)


def test_parse_label_lines_counts_each_bad_line():
    lines = ["0 0.5 0.5 0.2 0.2", "", "1 0.1 0.1 0.3 0.1 0.2 0.4", "2 0.5 0.5 0.2", "3 nan 0.5 0.1 0.1",
             "0 0.5 0.5 0.2 0.2"]  # duplicate of the first
    labels, bad = parse_label_lines(lines)
    assert bad == 2
    assert labels.shape == (2, 5)
    np.testing.assert_allclose(labels[1], [1, 0.2, 0.25, 0.2, 0.3], atol=1e-6)  # polygon -> its box


@pytest.mark.parametrize("imgsz", [64, 96])
def test_mosaic_augment_batch_shapes(tiny, imgsz):
    torch.manual_seed(0)
    loader, ds = create_dataloader(str(tiny / "images" / "train"), imgsz, 4, 32, hyp=HYP, augment=True,
                                   shuffle=True, workers=0)
    assert ds.mosaic
    n_batches = 0
    for imgs, targets, paths, shapes in loader:
        n_batches += 1
        assert imgs.dtype == torch.uint8 and imgs.shape == (4, 3, imgsz, imgsz)
        assert targets.ndim == 2 and targets.shape[1] == 6 and targets.dtype == torch.float32
        if len(targets):
            assert set(targets[:, 0].long().tolist()) <= set(range(4))
            assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
            assert (targets[:, 4:] > 0).all()
            assert (targets[:, 1] == targets[:, 1].round()).all() and targets[:, 1].max() < 6
        assert len(paths) == 4 and all(s is None for s in shapes)  # mosaic samples have no shapes
    assert n_batches == 2


def test_plain_augment_and_rect_val_batches(tiny):
    hyp = dict(HYP, mosaic=0.0, mixup=0.0)
    loader, ds = create_dataloader(str(tiny / "images" / "train"), 64, 3, 32, hyp=hyp, augment=True, workers=0)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (3, 3, 64, 64)
    (h0, w0), ((rh, rw), pad) = shapes[0]
    assert max(h0, w0) == 96 and max(round(rh * h0), round(rw * w0)) == 64  # long side resized to imgsz

    loader, ds = create_dataloader(str(tiny / "images" / "val"), 64, 2, 32, rect=True, pad=0.5, workers=0)
    seen = 0
    for imgs, targets, paths, shapes in loader:
        assert imgs.shape[2] % 32 == 0 and imgs.shape[3] % 32 == 0 and max(imgs.shape[2:]) <= 64 + 32
        for (h0, w0), ((rh, rw), (pw, ph)) in shapes:
            assert rh == pytest.approx(rw, rel=0.02) and pw >= 0 and ph >= 0
        seen += len(paths)
    assert seen == 4 and ds.rect and not ds.mosaic


def test_label_cache_is_reused_and_renewed(tiny, tmp_path, monkeypatch):
    images = _copy_split(tiny, tmp_path)
    ds = LoadImagesAndLabels(str(images), img_size=64)
    assert ds.cache_path.is_file()

    def boom(*a, **k):
        raise AssertionError("scanned again although the cache is valid")

    monkeypatch.setattr(dataloaders, "_build_cache", boom)
    again = LoadImagesAndLabels(str(images), img_size=64)
    assert [len(x) for x in again.labels] == [len(x) for x in ds.labels]
    monkeypatch.undo()

    lb = tmp_path / "labels" / "train" / "000002.txt"
    lb.write_text("0 0.5 0.5 0.25 0.25\n")  # a changed label file makes the cache stale
    renewed = LoadImagesAndLabels(str(images), img_size=64)
    i = next(k for k, f in enumerate(renewed.im_files) if f.endswith("000002.jpg"))
    np.testing.assert_allclose(renewed.labels[i], [[0, 0.5, 0.5, 0.25, 0.25]])


def test_classes_beyond_nc_are_skipped_counted_and_named(tiny, tmp_path, log_lines):
    """Issue 16.3: a label of class >= nc (also written 1e10) never reaches training or evaluation."""
    images = _copy_split(tiny, tmp_path)
    first = tmp_path / "labels" / "train" / "000003.txt"
    n_good = len([x for x in first.read_text().splitlines() if x.strip()])
    first.write_text(first.read_text() + "6 0.5 0.5 0.1 0.1\n1e10 0.4 0.4 0.1 0.1\n")
    nc = 6  # the demo data's classes are 0..5
    ds = LoadImagesAndLabels(str(images), img_size=64, nc=nc)
    i = next(k for k, f in enumerate(ds.im_files) if f.endswith("000003.jpg"))
    assert len(ds.labels[i]) == n_good and all(lb[:, 0].max() < nc for lb in ds.labels if len(lb))
    warn = [m for m in log_lines if "class >= nc=6" in m]
    assert len(warn) == 1 and "skipped 2 labels" in warn[0] and str(first) in warn[0]
    total = [m for m in log_lines if m.startswith("WARNING: skipped") and "bad label line" in m]
    assert total and "2 bad label lines" in total[-1]  # counted with the other bad lines
    # the cache is independent of nc: the same split read with more classes keeps them
    wide = LoadImagesAndLabels(str(images), img_size=64, nc=int(1e11))
    assert len(wide.labels[i]) == n_good + 2
    # and create_dataloader passes nc through
    _, ds2 = create_dataloader(str(images), 64, 2, 32, workers=0, nc=nc)
    assert sum(len(x) for x in ds2.labels) == sum(len(x) for x in ds.labels)


def test_float_tiff_is_skipped_and_counted(tiny, tmp_path, log_lines):
    """Issue 16.7: an image that decodes to float32 pixels counts as corrupt instead of ending the run."""
    from PIL import Image

    images = _copy_split(tiny, tmp_path)
    Image.fromarray(np.random.default_rng(0).random((48, 48), dtype=np.float32)).save(images / "float.tif")
    ds = LoadImagesAndLabels(str(images), img_size=64, batch_size=4)
    assert ds.n == 8 and not any(f.endswith("float.tif") for f in ds.im_files)
    warn = [m for m in log_lines if m.startswith("WARNING: skipped")]
    assert len(warn) == 1 and "1 corrupt image" in warn[0] and "float" in warn[0]
    for i in range(ds.n):  # every image that passed the scan loads
        ds[i]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_label_cache_is_rebuilt(tiny, tmp_path, damage):
    """Issue 16.7: a truncated or garbage labels/*.cache is scanned again, not a BadZipFile traceback."""
    images = _copy_split(tiny, tmp_path)
    ds = LoadImagesAndLabels(str(images), img_size=64)
    data = ds.cache_path.read_bytes()
    ds.cache_path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"PK\x03\x04" + b"x" * 200,
                               "empty": b""}[damage])
    again = LoadImagesAndLabels(str(images), img_size=64)
    assert [len(x) for x in again.labels] == [len(x) for x in ds.labels]
    # and written again: the next run reads it
    assert dataloaders.load_cache(again.cache_path, dataloaders.get_hash(again.label_files + again.im_files))


def test_missing_label_folder_says_so(tiny, tmp_path, log_lines):
    """A split without its labels folder: every image is a background, and the warning says that
    (not that a cache folder is unwritable)."""
    shutil.copytree(tiny / "images" / "train", tmp_path / "images" / "train")
    ds = LoadImagesAndLabels(str(tmp_path / "images" / "train"), img_size=64)
    assert ds.n == 8 and all(len(x) == 0 for x in ds.labels)
    warn = [m for m in log_lines if m.startswith("WARNING")]
    assert any("no label folder" in m for m in warn) and not any("not writeable" in m for m in warn), warn
