"""utils/safe_unpickle.py through models.experimental.load_checkpoint: a checkpoint can name our model
classes but never construct one with its own arguments, and carries no callable but upstream fuse()'s
`forward = forward_fuse` binding."""
import copyreg

import numpy as np
import pytest
import torch

from models import yolo
from models.experimental import load_checkpoint
from tests.qat.qat_testkit import fp32_model, noise_images, small_cfg
from utils.general import UserError
from utils.safe_unpickle import strip_fused_forward


@pytest.fixture
def constructions(monkeypatch):
    """Every DetectionModel.__init__ call, recorded (a safe load makes none)."""
    calls, init = [], yolo.DetectionModel.__init__

    def spy(self, *args, **kwargs):
        calls.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(yolo.DetectionModel, "__init__", spy)
    return calls


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

    @property
    def __class__(self):  # the pickler checks that NEWOBJ's class is the object's
        return self.args[0] if self.fn is copyreg.__newobj__ else _Reduce


@pytest.mark.parametrize("how", ["REDUCE", "NEWOBJ"])
def test_file_cannot_construct_a_model_class_with_its_own_arguments(tmp_path, constructions, how):
    """issue 16.1 in this repository: the crafted `DetectionModel(cfg)` pickle is refused, nothing is built."""
    cfg = small_cfg()
    evil = _Reduce(yolo.DetectionModel, cfg) if how == "REDUCE" else \
        _Reduce(copyreg.__newobj__, yolo.DetectionModel, cfg)  # pickle protocol 2 writes NEWOBJ with args
    torch.save({"model": evil, "epoch": 0}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert "refused by the safe loader" in str(e.value) and "models.yolo.DetectionModel" in str(e.value)
    assert "\n" not in str(e.value) and constructions == []


def test_models_are_assembled_without_init_and_predict_the_same(tmp_path, constructions):
    model = fp32_model("gelan-t")
    torch.save({"model": model, "ema": None}, tmp_path / "m.pt")
    constructions.clear()
    loaded = load_checkpoint(tmp_path / "m.pt")["model"]
    assert constructions == [] and type(loaded) is yolo.DetectionModel
    x = noise_images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_upstream_fused_forward_bindings_load_and_others_are_refused(tmp_path):
    model = fp32_model("gelan-t")
    convs = [m for m in model.modules() if hasattr(type(m), "forward_fuse")]
    for m in convs:
        m.forward = m.forward_fuse  # what upstream's fuse() does on every instance: pickles as getattr
    torch.save({"model": model}, tmp_path / "fused.pt")
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "fused.pt"))
    loaded = load_checkpoint(tmp_path / "fused.pt")["model"]
    bound = [m for m in loaded.modules() if "forward" in m.__dict__]
    assert len(bound) == len(convs) and all(m.forward.__func__ is type(m).forward_fuse for m in bound)

    for bad in (convs[0].fuse, convs[1].forward_fuse, convs[0].__init__):  # other method, other module
        convs[0].forward = bad
        torch.save({"model": model}, tmp_path / "bad.pt")
        with pytest.raises(UserError, match="refused by the safe loader"):
            load_checkpoint(tmp_path / "bad.pt")
    convs[0].forward = convs[0].forward_fuse
    model.extra = np._core.multiarray._reconstruct  # an allow-listed function, stored as data instead of called
    torch.save({"model": model}, tmp_path / "fn.pt")
    with pytest.raises(UserError, match="stores a callable"):
        load_checkpoint(tmp_path / "fn.pt")


def test_stripped_bindings_are_restored_after_loading(tmp_path):
    model = fp32_model("gelan-t")
    convs = [m for m in model.modules() if hasattr(type(m), "forward_fuse")]
    for m in convs:
        m.forward = m.forward_fuse
    names = strip_fused_forward(model)
    assert len(names) == len(convs) and not any("forward" in m.__dict__ for m in convs)
    torch.save({"model": model}, tmp_path / "s.pt")
    assert "builtins.getattr" not in torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "s.pt"))
    loaded = load_checkpoint(tmp_path / "s.pt")["model"]
    assert sum("forward" in m.__dict__ for m in loaded.modules()) == len(convs)
    model.fused_forward_modules = ["model.0", "model.nowhere"]  # a list naming what is not there
    torch.save({"model": model}, tmp_path / "s2.pt")
    with pytest.raises(UserError, match="model.nowhere"):
        load_checkpoint(tmp_path / "s2.pt")
