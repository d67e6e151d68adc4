"""Bad input to the safe loader and the model builder: one-line UserErrors, and nothing executed."""
import datetime
import os
import pickle

import pytest
import torch

from models.experimental import attempt_load, load_checkpoint
from models.yolo import DetectionModel, load_model_yaml
from tests.peer import one_thread  # noqa: F401  (fixture)
from utils.general import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "ELAN1", [32, 32, 16]],
                     [-1, 1, "AConv", [32]], [-1, 1, "AConv", [32]], [-1, 1, "AConv", [32]]],
        "head": [[[3, 4, 5], 1, "DDetect", ["nc"]]]}


class _Marker:
    """Unpickling this would call os.system and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny():
    return DetectionModel(TINY)


@pytest.fixture(scope="module")
def good_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    torch.save({"model": tiny, "epoch": -1}, path)
    return path


def _error(weights, **kw):
    with pytest.raises(UserError) as e:
        load_checkpoint(weights, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg
    return msg


def test_good_file_loads(good_file, tiny):
    model = attempt_load(good_file)
    assert type(model) is DetectionModel and not model.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], tiny.eval()(x)[0], rtol=1e-4, atol=1e-4)


def test_missing_and_empty(tmp_path):
    assert "not found" in _error(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").touch()
    assert "empty" in _error(tmp_path / "empty.pt")
    assert "directory" in _error(tmp_path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated(good_file, tmp_path, keep):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in _error(bad)


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not the weights you are looking for\n")
    assert "not a PyTorch checkpoint" in _error(text)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    assert "ONNX" in _error(onnx)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert "not a YOLOv9 checkpoint" in _error(tensor)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_code_in_pickle_is_refused_and_not_run(tiny, tmp_path, fmt):
    """A checkpoint whose pickle would run os.system: refused, the global named, nothing executed,
    whether a current torch file, a legacy (pre-1.6) torch file or a bare pickle."""
    marker = tmp_path / "executed"
    obj = {"model": tiny, "payload": _Marker(marker)}
    path = tmp_path / f"evil-{fmt}.pt"
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))  # STACK_GLOBAL, not GLOBAL
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    msg = _error(path)
    assert f"'{os.system.__module__}.system'" in msg and "--trusted" in msg
    with pytest.raises(UserError):
        attempt_load(path)
    assert not marker.exists()


def test_trusted_opt_in(tiny, tmp_path):
    """A harmless extra global (a datetime object) is refused by default and loads with trusted=True."""
    path = tmp_path / "dated.pt"
    torch.save({"model": tiny, "date": datetime.datetime(2024, 2, 21)}, path)
    assert "'datetime.datetime'" in _error(path)
    ckpt = load_checkpoint(path, trusted=True)
    assert ckpt["date"].year == 2024
    assert type(attempt_load(path, trusted=True)) is DetectionModel


def test_yaml_unknown_module(tmp_path):
    cfg = dict(TINY, backbone=[[-1, 1, "__import__('os').system", ["true"]]] + TINY["backbone"][1:])
    with pytest.raises(UserError, match=r"unknown module .*__import__"):
        DetectionModel(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text("nc: 2\nbackbone: [[-1, 1, NotAModule, [16]]]\nhead: []\n")
    with pytest.raises(UserError, match="layer 0 names unknown module 'NotAModule'") as e:
        DetectionModel(path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_model_yaml(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="activation"):
        DetectionModel(dict(TINY, activation="os.system('true')"))
