"""tools/reparameterize.py: a dual-head model's converted single-head model gives its main-head output."""
from copy import deepcopy

import pytest
import torch

from models.experimental import attempt_load, load_checkpoint, model_from_checkpoint
from models.yolo import DDetect, DetectionModel
from tests.peer import one_thread  # noqa: F401  (fixture)
from tests.peer import (assert_outputs_close, load_peer, peer_cfg, pickled_as_upstream, quiet_peer,
                        randomize_bn)
from tools import reparameterize
from utils.general import UserError
from utils.torch_utils import save_atomic

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = "models/detect/{}.yaml"
NC, IMG = 3, 64


def _dual(name, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(DetectionModel(CFG.format(name), nc=NC), seed=seed).eval()


def _main_head(dual, x):
    """(y_main, d_main) of a dual model's eval output ([y_aux, y_main], [d_aux, d_main])."""
    with torch.no_grad():
        (_, y), (_, d) = dual(x)
    return y, d


def _save_training_checkpoint(model, path):
    """Upstream train.py's layout, half precision. Only `model` is filled: the pure-Python safe unpickler
    takes seconds per model, and the choice between ema and model is tested with the loader."""
    return save_atomic({"epoch": 9, "best_fitness": None, "model": deepcopy(model).half(), "ema": None,
                        "updates": 5, "optimizer": None, "opt": {}, "date": "2024-02-22"}, path)


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        reparameterize.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("name,cfg", [("yolov9-t", None), ("yolov9-c", "gelan-c")])
def test_cli_converted_equals_main_head(tmp_path, name, cfg):
    dual = _dual(name)
    weights = _save_training_checkpoint(dual, tmp_path / f"{name}.pt")
    ref = _main_head(deepcopy(dual).half().float(), x := torch.rand(2, 3, IMG, IMG))
    argv = ["--weights", str(weights)] + (["--cfg", CFG.format(cfg)] if cfg else [])  # no --cfg: from the yaml name
    out = reparameterize.main(argv)
    assert out == tmp_path / f"{name}-converted.pt" and out.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left

    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is None and ckpt["ema"] is None  # upstream's converted layout
    assert next(ckpt["model"].parameters()).dtype == torch.float16
    assert type(ckpt["model"].model[-1]) is DDetect and not hasattr(ckpt["model"].model[-1], "cv4")
    assert ckpt["model"].yaml_file == f"{(cfg or name.replace('yolov9', 'gelan'))}.yaml"
    model = model_from_checkpoint(ckpt)  # what attempt_load(out) returns, without reading the file again
    with torch.no_grad():
        assert_outputs_close(model(x), ref)


@pytest.mark.parametrize("name", ["yolov9-s", "yolov9-m", "yolov9-e"])
def test_mapping_other_sizes(name):
    """The graph walk finds the mapping for every size (yolov9-e: two backbones joined by CBLinear/CBFuse)."""
    dual = _dual(name, seed=1)
    single = reparameterize.reparameterize_model(dual, CFG.format(name.replace("yolov9", "gelan")))
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert_outputs_close(single(x), _main_head(dual, x))


def test_upstream_checkpoint(tmp_path):
    """A yolov9-t checkpoint pickled by upstream's code converts to the peer's own main-head output."""
    yolo, _ = load_peer()
    quiet_peer()
    torch.manual_seed(2)
    peer_model = randomize_bn(yolo.DetectionModel(str(peer_cfg("yolov9-t")), nc=NC), seed=2).eval()
    peer_model.names = ["a", "b", "c"]
    with pickled_as_upstream():
        torch.save({"model": deepcopy(peer_model).half(), "ema": None, "epoch": 3}, tmp_path / "up.pt")
    x = torch.rand(1, 3, IMG, IMG)
    ref = _main_head(deepcopy(peer_model).half().float(), x)
    out = reparameterize.run(tmp_path / "up.pt", CFG.format("gelan-t"), tmp_path / "conv.pt")
    model = attempt_load(out)
    assert model.names == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        assert_outputs_close(model(x), ref)


def test_bad_input(tmp_path, capsys):
    dual = _dual("yolov9-t")
    with pytest.raises(UserError, match="does not match"):  # wrong size
        reparameterize.reparameterize_model(dual, CFG.format("gelan-s"))
    with pytest.raises(UserError, match="does not match"):
        reparameterize.reparameterize_model(_dual("yolov9-s"), CFG.format("gelan-t"))
    with pytest.raises(UserError, match="single-head GELAN config"):
        reparameterize.reparameterize_model(dual, CFG.format("yolov9-t"))
    # the CLI: one line on stderr, exit status 2
    weights = tmp_path / "yolov9-t.pt"
    assert "overwrite" in _run_cli(["--weights", str(weights), "--out", str(weights)], capsys)
    assert "not found" in _run_cli(["--weights", str(weights)], capsys)
    single = save_atomic({"model": DetectionModel(CFG.format("gelan-t"), nc=NC)}, tmp_path / "gelan-t.pt")
    assert "not a dual-head" in _run_cli(["--weights", str(single), "--cfg", CFG.format("gelan-t")], capsys)
    anon = deepcopy(dual)  # a model whose yaml name says nothing: --cfg is required
    del anon.yaml_file
    save_atomic({"model": anon}, tmp_path / "anon.pt")
    assert "pass --cfg" in _run_cli(["--weights", str(tmp_path / "anon.pt")], capsys)


def test_out_folder_is_one_line(tmp_path, capsys):
    """Issue 16.9: --out naming a folder is refused up front, with the file name to use instead."""
    weights = tmp_path / "yolov9-t.pt"
    save_atomic({"model": _dual("yolov9-t")}, weights)
    out = tmp_path / "converted"
    out.mkdir()
    line = _run_cli(["--weights", str(weights), "--out", str(out)], capsys)
    assert "is a folder" in line and str(out / "yolov9-t-converted.pt") in line
    assert list(out.iterdir()) == []
