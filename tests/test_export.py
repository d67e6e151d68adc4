"""export.py: FP32 ONNX export; ONNX Runtime gives PyTorch's eval output."""
import ast
import json
import logging
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

import export
from models.experimental import attempt_load
from models.yolo import DetectionModel
from qat.export import simplify_onnx
from tests.peer import one_thread  # noqa: F401  (fixture)
from tests.peer import assert_outputs_close, randomize_bn
from utils.general import LOGGER, UserError
from utils.torch_utils import save_atomic

pytestmark = pytest.mark.usefixtures("one_thread")
NC, IMG = 3, 64


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = randomize_bn(DetectionModel(f"models/detect/{cfg}.yaml", nc=NC), seed=seed)
    m.names = ["a", "b", "c"]
    return m


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """gelan-t (nc=3) saved as a checkpoint and exported by the CLI with --dynamic."""
    d = tmp_path_factory.mktemp("export")
    weights = save_atomic({"model": _model("gelan-t").half(), "ema": None, "epoch": -1}, d / "tiny.pt")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = export.main(["--weights", str(weights), "--imgsz", str(IMG), "--dynamic"])
    finally:
        torch.set_num_threads(before)
    return weights, out


def test_cli_writes_beside_weights(exported):
    weights, out = exported
    assert out == weights.with_suffix(".onnx") and out.stat().st_size > 1e6
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["images"] and [o.name for o in m.graph.output] == ["output0"]
    meta = {p.key: p.value for p in m.metadata_props}
    # JSON, and names also a Python literal for upstream's DetectMultiBackend, which eval()s the value
    assert json.loads(meta["stride"]) == 32 and json.loads(meta["names"]) == ["a", "b", "c"] == \
        ast.literal_eval(meta["names"])
    assert meta["qat"] == "0" and json.loads(meta["imgsz"]) == [IMG, IMG]
    assert not [f for f in out.parent.iterdir() if f.name.endswith(".tmp")]  # no temporary left behind


@pytest.mark.parametrize("shape", [(1, IMG, IMG), (2, IMG, IMG), (2, 96, 128)])
def test_onnxruntime_equals_pytorch(exported, shape):
    """Dynamic batch (and size): ONNX Runtime's output0 equals the fused model's eval output."""
    weights, out = exported
    model = attempt_load(weights)  # fused FP32, as exported
    x = torch.rand(shape[0], 3, *shape[1:])
    with torch.no_grad():
        ref = model(x)[0]
    y = _session(out).run(["output0"], {"images": x.numpy()})[0]
    anchors = sum((shape[1] // s) * (shape[2] // s) for s in (8, 16, 32))
    assert y.shape == (shape[0], 4 + NC, anchors)
    assert_outputs_close(torch.from_numpy(y), ref)


def test_dual_head_exports_main_head(tmp_path):
    """export_onnx on a dual-head model: one output, the main head's; the model is left as it was."""
    model = _model("yolov9-t", seed=1).fuse().eval()
    head = model.model[-1]
    path = export.export_onnx(model, tmp_path / "dual.onnx", (IMG, IMG + 32), batch_size=2)
    assert not head.export and not head.dynamic and not head._forward_hooks and not model.training
    x = torch.rand(2, 3, IMG, IMG + 32)
    with torch.no_grad():
        (_, y_main), _ = model(x)
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["output0"] and sess.get_inputs()[0].shape == [2, 3, IMG, IMG + 32]
    assert_outputs_close(torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]), y_main)


def test_simplify(tmp_path):
    """--simplify (onnxslim, seconds even on gelan-t: a few layers here) keeps the outputs and dynamic axes."""
    pytest.importorskip("onnxslim")
    tiny = {"nc": NC, "depth_multiple": 1.0, "width_multiple": 1.0,
            "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "ELAN1", [32, 32, 16]],
                         [-1, 1, "ADown", [32]], [-1, 1, "AConv", [32]], [-1, 1, "AConv", [32]]],
            "head": [[[3, 4, 5], 1, "DDetect", ["nc"]]]}
    torch.manual_seed(0)
    model = randomize_bn(DetectionModel(tiny)).fuse().eval()
    path = export.export_onnx(model, tmp_path / "tiny.onnx", IMG, dynamic=True, simplify=True)
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)[0]
    assert_outputs_close(torch.from_numpy(_session(path).run(None, {"images": x.numpy()})[0]), ref)


def test_simplify_without_onnxslim(exported, tmp_path, monkeypatch):
    _, out = exported
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(out.read_bytes())
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # import onnxslim -> ImportError
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    LOGGER.addHandler(handler)
    try:
        simplify_onnx(copy)
    finally:
        LOGGER.removeHandler(handler)
    assert any("onnxslim" in r.getMessage() for r in records) and copy.read_bytes() == out.read_bytes()


def test_bad_input(exported, tmp_path, capfd):
    weights, _ = exported
    for argv, words in ([["--weights", str(tmp_path / "missing.pt")], "not found"],
                        [["--weights", str(weights), "--imgsz", "65"], "multiple of the model stride 32"],
                        [["--weights", str(weights.with_suffix(".onnx"))], "already ONNX"],
                        [["--weights", str(weights), "--batch-size", "0"], "--batch-size: 0 is not"],
                        [["--weights", str(weights), "--opset", "5"], "--opset: 5 is not a whole number in [13, "]):
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_not_a_detection_model(tmp_path):
    with pytest.raises(UserError, match="no DDetect"):
        export.export_onnx(torch.nn.Conv2d(3, 4, 1), tmp_path / "x.onnx", 32)
    assert not list(tmp_path.iterdir())


def test_failed_export_keeps_the_previous_file(exported, monkeypatch, capfd):
    """A failure after torch.onnx.export wrote the new file (a post-process that raises, as a kill or a
    full disk would stop it) leaves the previous good file in place and no temporary file."""
    import qat.export

    weights, out = exported
    before = out.read_bytes()

    def failing_metadata(path, meta):
        assert Path(path) != out and Path(path).stat().st_size > 0  # the new export exists, under a temp name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qat.export, "_add_metadata", failing_metadata)
    with pytest.raises(UserError, match="No space left on device.*the old tiny.onnx is unchanged"):
        export.run(weights, imgsz=(IMG,))
    assert out.read_bytes() == before
    assert not [f for f in out.parent.iterdir() if f.name.endswith(".tmp")]
