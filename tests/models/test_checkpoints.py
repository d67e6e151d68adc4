"""Upstream YOLOv9 checkpoints (pickled by the `yolo9` peer under upstream's module paths `models.*`)
load through our safe loader into our classes and give the peer's outputs."""
from copy import deepcopy
from datetime import datetime

import numpy as np
import pytest
import torch

from models.experimental import attempt_load, load_checkpoint, model_from_checkpoint
from models.yolo import DDetect, DetectionModel, DualDDetect
from tests.peer import one_thread  # noqa: F401  (fixture)
from tests.peer import (MINI_DUAL, assert_outputs_close, flat_tensors, load_peer, peer_cfg, pickled_as_upstream,
                        quiet_peer, randomize_bn)

pytestmark = pytest.mark.usefixtures("one_thread")
NC, IMG = 3, 64


@pytest.fixture(scope="module")
def peer():
    yolo, _ = load_peer()
    quiet_peer()
    return yolo


def _peer_model(peer, name, seed):
    torch.manual_seed(seed)
    cfg = deepcopy(MINI_DUAL) if name == "mini-dual" else str(peer_cfg(name))
    m = randomize_bn(peer.DetectionModel(cfg, nc=NC), seed=seed)
    m.nc, m.names, m.hyp = NC, ["cat", "dog", "fox"], {"box": 7.5, "cls": 0.5, "dfl": 1.5}
    return m


def _reference(model, x):
    """The peer's eval output with the weights as stored: rounded to half, computed in float."""
    m = deepcopy(model).half().float().eval()
    with torch.no_grad():
        return m(x)


def _train_layout(model, ema):
    """What upstream train.py saves each epoch (numpy best_fitness, opt as a dict, git info, date)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
    sum(t.sum() for t in flat_tensors(model(torch.rand(1, 3, IMG, IMG)))).backward()
    opt.step()  # momentum buffers in the optimizer state
    return {"epoch": 4, "best_fitness": np.array([0.3125]), "model": deepcopy(model).half(),
            "ema": deepcopy(ema).half(), "updates": 40, "optimizer": opt.state_dict(),
            "opt": {"weights": "", "cfg": "gelan-t.yaml", "imgsz": 640, "epochs": 5, "hyp": {"lr0": 0.01},
                    "single_cls": False, "save_dir": "runs/train/exp", "close_mosaic": np.int64(15),
                    "fl_gamma": np.float64(0.0)},
            "git": {"remote": "https://github.com/WongKinYiu/yolov9", "branch": "main", "commit": "5b1ea9a"},
            "date": datetime.now().isoformat()}


def _converted_layout(model):
    """What upstream's reparameterization notebook saves for *-converted.pt."""
    return {"model": deepcopy(model).eval().half(), "optimizer": None, "best_fitness": None, "ema": None,
            "updates": None, "opt": None, "git_hash": None, "date": None, "epoch": -1}


def _save_as_upstream(obj, path):
    with pickled_as_upstream():
        torch.save(obj, path)
    refs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert "models.common.Conv" in refs and not any(r.startswith("yolo9") for r in refs)  # really upstream paths
    return path


def _check_loaded(model, head_type):
    assert type(model) is DetectionModel and type(model.model[-1]) is head_type  # our classes
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.names == {0: "cat", 1: "dog", 2: "fox"} and torch.equal(model.stride, torch.tensor([8., 16., 32.]))


@pytest.mark.parametrize("name,head", [("gelan-t", DDetect), ("yolov9-t", DualDDetect)])
def test_upstream_train_checkpoint(peer, tmp_path, name, head):
    model = _peer_model(peer, name, seed=1)
    ema = randomize_bn(deepcopy(model), seed=2)  # differs from model: the loader must pick ema
    x = torch.rand(1, 3, IMG, IMG)
    ref = _reference(ema, x)
    path = _save_as_upstream(_train_layout(model, ema), tmp_path / "last.pt")

    # attempt_load(path) is load_checkpoint + model_from_checkpoint; the pure-Python safe unpickler takes
    # seconds on a file with model, ema and optimizer state, so this test reads it once
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["best_fitness"], np.ndarray) and ckpt["epoch"] == 4 and ckpt["opt"]["imgsz"] == 640
    assert ckpt["optimizer"]["state"] and ckpt["model"].model[0].conv.weight.dtype == torch.float16
    fused = model_from_checkpoint(deepcopy(ckpt))  # fused by default
    _check_loaded(fused, head)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    unfused = model_from_checkpoint(ckpt, fuse=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfused.modules())
    with torch.no_grad():
        assert_outputs_close(fused(x), ref)
        assert_outputs_close(unfused(x), ref)
        with pytest.raises(AssertionError):  # the test can tell ema from model
            assert_outputs_close(fused(x), _reference(model, x))


@pytest.mark.parametrize("name", ["gelan-t", "yolov9-t", "mini-dual"])  # mini-dual: every module class
def test_upstream_converted_checkpoint(peer, tmp_path, name):
    model = _peer_model(peer, name, seed=4)
    x = torch.rand(2, 3, IMG, IMG)
    ref = _reference(model, x)
    path = _save_as_upstream(_converted_layout(model), tmp_path / f"{name}-converted.pt")
    loaded = attempt_load(path)
    _check_loaded(loaded, DDetect if name.startswith("gelan") else DualDDetect)
    with torch.no_grad():
        assert_outputs_close(loaded(x), ref)


def test_fused_peer_model_loads(peer, tmp_path):
    """A model the peer already fused (BN folded, RepConvN merged) loads and runs unchanged."""
    model = _peer_model(peer, "gelan-t", seed=5).eval().fuse()
    x = torch.rand(1, 3, IMG, IMG)
    ref = _reference(model, x)
    for m in model.modules():  # upstream's fuse() points `forward` at forward_fuse per instance: a bound
        m.__dict__.pop("forward", None)  # method, which needs builtins.getattr to unpickle; not stored here
    path = _save_as_upstream(_converted_layout(model), tmp_path / "fused.pt")
    loaded = attempt_load(path)
    with torch.no_grad():
        assert_outputs_close(loaded(x), ref)
