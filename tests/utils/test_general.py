"""Tests for utils.general: box conversions, scale_boxes, NMS, image size and dataset checks, CLI helper."""
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.general import (UserError, check_dataset, check_img_size, clip_boxes, file_size, increment_path,
                           non_max_suppression, run_cli, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn,
                           yaml_load, yaml_save)


# ---------------------------------------------------------------------------------------------
# boxes
def _random_xyxy(n, size=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat((xy, xy + wh), 1)


def test_box_conversions_round_trip_tensor_and_numpy():
    b = _random_xyxy(50)
    assert torch.allclose(xywh2xyxy(xyxy2xywh(b)), b, atol=1e-4)
    assert torch.allclose(xywhn2xyxy(xyxy2xywhn(b, w=320, h=240), w=320, h=240), b, atol=1e-4)
    n = b.numpy().astype(np.float64)
    assert np.allclose(xywh2xyxy(xyxy2xywh(n)), n)
    assert np.allclose(xywhn2xyxy(xyxy2xywhn(n, w=320, h=240), w=320, h=240), n)
    # values and no aliasing
    x = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert xyxy2xywh(x).tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert x.tolist() == [[10.0, 20.0, 30.0, 60.0]]
    assert xywhn2xyxy(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), w=100, h=200, padw=3, padh=4).tolist() == \
        [[28.0, 54.0, 78.0, 154.0]]
    assert xyxy2xywh(np.array([[0, 0, 2, 4]])).dtype.kind == "f"  # integer input gives floats


def test_clip_and_xyxy2xywhn_clip():
    b = torch.tensor([[-5.0, -5.0, 120.0, 50.0]])
    clip_boxes(b, (40, 100))
    assert b.tolist() == [[0.0, 0.0, 100.0, 40.0]]
    b = torch.tensor([[-10.0, 0.0, 50.0, 50.0]])
    y = xyxy2xywhn(b, w=100, h=100, clip=True)
    assert torch.allclose(y, torch.tensor([[0.25, 0.25, 0.5, 0.5]]))


def test_scale_boxes_undoes_letterbox():
    h0, w0 = 300, 400  # original
    gain, pad = 0.8, (0.0, 40.0)  # 400x300 -> 320x240 in a 320x320 letterbox, 40 px bands top/bottom
    native = torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 400.0, 300.0]])
    boxed = native * gain + torch.tensor([pad[0], pad[1], pad[0], pad[1]])
    out = scale_boxes((320, 320), boxed.clone(), (h0, w0), ((gain, gain), pad))
    assert torch.allclose(out, native, atol=1e-4)
    out = scale_boxes((320, 320), boxed.clone(), (h0, w0))  # letterbox recomputed
    assert torch.allclose(out, native, atol=1e-4)
    out = scale_boxes((320, 320), torch.tensor([[-10.0, 0.0, 330.0, 330.0]]), (h0, w0), ((gain, gain), pad))
    assert out.tolist() == [[0.0, 0.0, 400.0, 300.0]]  # clipped to the original image


# ---------------------------------------------------------------------------------------------
# NMS
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference_nms(pred, conf_thres, iou_thres, multi_label, agnostic, max_det):
    """Brute-force greedy NMS in plain Python, for one image: pred (4+nc, A)."""
    rows = []
    for a in range(pred.shape[1]):
        cx, cy, w, h = pred[:4, a].tolist()
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        scores = pred[4:, a].tolist()
        if multi_label:
            rows += [box + [s, float(c)] for c, s in enumerate(scores) if s > conf_thres]
        else:
            c = int(np.argmax(scores))
            if scores[c] > conf_thres:
                rows.append(box + [scores[c], float(c)])
    rows.sort(key=lambda r: -r[4])
    kept = []
    for r in rows:
        if all(not ((agnostic or k[5] == r[5]) and _iou(k, r) > iou_thres) for k in kept):
            kept.append(r)
    return kept[:max_det]


def _random_prediction(bs=2, nc=3, anchors=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(bs, 2, 6, generator=g) * 100  # a few clusters -> many overlaps
    idx = torch.randint(0, 6, (bs, anchors), generator=g)
    xy = torch.gather(centres, 2, idx[:, None].expand(bs, 2, anchors)) + torch.randn(bs, 2, anchors, generator=g) * 4
    wh = 10 + torch.rand(bs, 2, anchors, generator=g) * 20
    scores = torch.rand(bs, nc, anchors, generator=g) ** 2
    return torch.cat((xy, wh, scores), 1)


@pytest.mark.parametrize("multi_label,agnostic", [(False, False), (True, False), (False, True)])
def test_nms_matches_brute_force(multi_label, agnostic):
    pred = _random_prediction()
    out = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.45, multi_label=multi_label, agnostic=agnostic,
                              max_det=300)
    for xi, det in enumerate(out):
        ref = _reference_nms(pred[xi], 0.1, 0.45, multi_label, agnostic, 300)
        assert det.shape == (len(ref), 6)
        assert torch.allclose(det, torch.tensor(ref), atol=1e-4)


def test_nms_max_det_classes_and_empty():
    pred = _random_prediction(bs=1)
    full = non_max_suppression(pred, 0.05, 0.45)[0]
    top = non_max_suppression(pred, 0.05, 0.45, max_det=3)[0]
    assert len(top) == 3 and torch.equal(top, full[:3])
    only1 = non_max_suppression(pred, 0.05, 0.45, classes=[1])[0]
    assert len(only1) and (only1[:, 5] == 1).all()
    none = non_max_suppression(pred, 0.999999, 0.45)
    assert none[0].shape == (0, 6)


def test_nms_takes_model_eval_outputs():
    y = _random_prediction(seed=1)
    ref = non_max_suppression(y, 0.1, 0.5)
    train_out = [torch.zeros(2, 67, 8, 8)]
    # DDetect eval: (y, x); a stand-in's (y, None); DualDDetect eval: ([y1, y2], [d1, d2]) -> main head y2
    for out in [(y, train_out), (y, None), ([y * 0, y], [train_out, train_out]), [y * 0, y]]:
        got = non_max_suppression(out, 0.1, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_nms_autolabel_labels():
    pred = torch.zeros(1, 6, 4)  # nothing above threshold
    labels = [torch.tensor([[1.0, 50.0, 50.0, 20.0, 10.0]])]  # cls, cx, cy, w, h
    out = non_max_suppression(pred, 0.25, 0.45, labels=labels)[0]
    assert out.tolist() == [[40.0, 45.0, 60.0, 55.0, 1.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# sizes, paths, yaml
def test_check_img_size():
    assert check_img_size(640) == 640
    assert check_img_size([640, 480], s=32) == [640, 480]
    assert check_img_size(256, s=torch.tensor([8.0, 16.0, 32.0])) == 256
    with pytest.raises(UserError, match=r"--imgsz 250 is not a multiple of the model stride 32: use 256"):
        check_img_size(250)
    with pytest.raises(UserError, match="use 672"):
        check_img_size([640, 650])
    with pytest.raises(UserError, match="minimum"):
        check_img_size(32, floor=64)
    for bad in (100000, 0, -32):  # issue 16.9: never a model run at 100000 px, never a silent default
        with pytest.raises(UserError, match=f"--imgsz {bad}"):
            check_img_size(bad)


def test_increment_path_and_file_size(tmp_path):
    p = tmp_path / "exp"
    assert increment_path(p) == p
    p.mkdir()
    assert increment_path(p) == tmp_path / "exp2"
    assert increment_path(p, exist_ok=True) == p
    (tmp_path / "exp2").mkdir()
    assert increment_path(p, sep="_", mkdir=True) == tmp_path / "exp_2" and (tmp_path / "exp_2").is_dir()
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * (1 << 20))
    assert increment_path(f) == tmp_path / "a2.txt"
    assert file_size(f) == pytest.approx(1.0) and file_size(tmp_path) == pytest.approx(1.0)
    assert file_size(tmp_path / "missing") == 0.0


def test_yaml_round_trip(tmp_path):
    f = tmp_path / "x.yaml"
    yaml_save(f, {"b": 1, "a": Path("/x/y"), "names": ["p", "q"]})
    assert yaml_load(f) == {"b": 1, "a": "/x/y", "names": ["p", "q"]}
    assert list(yaml_load(f)) == ["b", "a", "names"]


def test_yaml_save_on_a_full_disk_keeps_the_old_file(tmp_path, fill_disk, monkeypatch):
    """opt.yaml / hyp.yaml go through the atomic writer: a failed save leaves the previous file whole."""
    f = tmp_path / "opt.yaml"
    yaml_save(f, {"epochs": 1})
    fill_disk()
    with pytest.raises(UserError, match="disk full"):
        yaml_save(f, {"epochs": 2, "names": ["x"] * 1000})
    monkeypatch.undo()
    assert yaml_load(f) == {"epochs": 1} and [p.name for p in tmp_path.iterdir()] == ["opt.yaml"]


# ---------------------------------------------------------------------------------------------
# check_dataset
def _dataset(tmp_path, body):
    root = tmp_path / "ds"
    for d in ("images/train", "images/val"):
        (root / d).mkdir(parents=True, exist_ok=True)
    f = root / "data.yaml"
    f.write_text(textwrap.dedent(body))
    return root, f


def test_check_dataset_resolves_paths(tmp_path, monkeypatch):
    root, f = _dataset(tmp_path, """
        path: .
        train: images/train
        val: [images/val]
        test: images/test
        names: {0: cat, 1: dog}
    """)
    monkeypatch.chdir(tmp_path)  # ./ exists here but holds no splits -> resolved against the yaml's folder
    assert check_dataset(str(f))["path"] == str(root.resolve())
    other = tmp_path / "other"
    for sub in ("images/train", "images/val"):
        (other / sub).mkdir(parents=True)
    monkeypatch.chdir(other)  # a dataset at ./ in the cwd wins
    assert check_dataset(f)["path"] == str(other.resolve())
    monkeypatch.chdir(root)
    d = check_dataset(f)
    assert d["path"] == str(root.resolve())
    assert d["train"] == str((root / "images/train").resolve())
    assert d["val"] == [str((root / "images/val").resolve())]
    assert d["test"] == str((root / "images/test").resolve())  # optional split: a warning only
    assert d["names"] == ["cat", "dog"] and d["nc"] == 2


def test_check_dataset_relative_path_falls_back_to_yaml_dir(tmp_path, monkeypatch):
    root, f = _dataset(tmp_path, "path: ../ds\ntrain: images/train\nval: images/val\nnames: [a]\nnc: 1\n")
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # ../ds does not exist here -> resolved against the yaml's folder
    d = check_dataset(f)
    assert d["path"] == str(root.resolve()) and d["val"] == str((root / "images/val").resolve())
    # a dict works as well, and a missing 'path' means the current directory
    monkeypatch.chdir(root)
    d = check_dataset({"train": "images/train", "val": "images/val", "names": ["a"]})
    assert d["val"] == str((root / "images/val").resolve())


@pytest.mark.parametrize("body,message", [
    ("train: images/train\nnames: [a]\n", r"key 'val' is missing"),
    ("train: images/train\nval: images/val\n", r"key 'names' is missing"),
    ("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n", r"nc is 3 but names lists 2 classes"),
    ("train: images/train\nval: images/nope\nnames: [a]\n", r"val split not found at .*images/nope"),
    ("train: images/train\nval: images/val\nnames: {1: a}\n", r"'names' keys must be the class indices"),
    ("- just\n- a list\n", r"does not hold a mapping"),
    # issue 16.9: the schema of nc and names
    ("train: images/train\nval: images/val\nnames: [a]\nnc: six\n", r"nc must be the number of classes"),
    ("train: images/train\nval: images/val\nnames: [a]\nnc: [1]\n", r"nc must be the number of classes"),
    ("train: images/train\nval: images/val\nnames: {0: a, x: b}\n", r"'names' keys must be the class indices"),
    ("train: images/train\nval: images/val\nnames: {0: a, true: b}\n", r"'names' keys must be the class indices"),
    ("train: images/train\nval: images/val\nnames: []\n", r"non-empty list of class names"),
    ("train: images/train\nval: images/val\nnames: 5\n", r"non-empty list of class names"),
])
def test_check_dataset_errors(tmp_path, monkeypatch, body, message):
    root, f = _dataset(tmp_path, body)
    monkeypatch.chdir(root)
    with pytest.raises(UserError, match=message) as e:
        check_dataset(f)
    assert "\n" not in str(e.value)


def test_check_dataset_missing_yaml_and_required_splits(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"data yaml .*missing.yaml not found"):
        check_dataset(tmp_path / "missing.yaml")
    root, f = _dataset(tmp_path, "train: images/nope\nval: images/val\nnames: [a]\n")
    monkeypatch.chdir(root)
    with pytest.raises(UserError, match="train split not found"):
        check_dataset(f)
    assert check_dataset(f, required=("val",))["nc"] == 1  # val.py only needs its split


# ---------------------------------------------------------------------------------------------
# CLI helper
def test_run_cli_exit_codes(capsys):
    def bad():
        raise UserError("--imgsz 250 is not a multiple of the model stride 32: use 256")

    with pytest.raises(SystemExit) as e:
        run_cli(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --imgsz 250 is not a multiple of the model stride 32: use 256\n"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run_cli(interrupted)
    assert e.value.code == 130 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert run_cli(lambda: 7) == 7



def test_coco_yaml_has_upstreams_keys_and_names_and_says_where_coco_goes(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec("yolo9")
    if spec is None:
        pytest.skip("test-only peer 'yolo9' is not installed")
    root = Path(__file__).resolve().parents[2]
    ours = yaml_load(root / "data" / "coco.yaml")
    upstream = yaml_load(Path(spec.origin).parent / "data" / "coco.yaml")
    assert all(ours[k] == upstream[k] for k in ("path", "train", "val", "test"))
    assert ours["names"] == upstream["names"] and len(ours["names"]) == 80
    monkeypatch.chdir(tmp_path)  # no COCO anywhere
    with pytest.raises(UserError, match=r"COCO not found at .*images/\{train2017,val2017\}"):
        check_dataset(root / "data" / "coco.yaml", required=("val",))
