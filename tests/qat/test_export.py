"""qat.export and export_qat.py: Q/DQ ONNX that lints clean and computes what the fake-quant model does."""
import re
from pathlib import Path

import onnx
import pytest
import torch

import qat_testkit as kit
from qat.deploy import load_backend
from qat.deploy.openvino_rewrites import weight_levels
from qat.graph import import_graph, metadata, qdq_counts
from qat.lint import lint, module_name, summary
from utils.general import UserError, non_max_suppression


def _fake_quant_output(x, **kw):
    with torch.no_grad():
        return kit.export_mode(kit.qat_model(**kw))(x)


def test_qat_export_lints_clean_and_records_metadata():
    path = kit.onnx_path("qat")
    assert lint(path) == []
    meta = metadata(path)
    assert meta["qat"] == 1 and meta["imgsz"] == [kit.IMGSZ, kit.IMGSZ] and meta["strides"] == [8, 16, 32]
    assert meta["names"] == kit.NAMES
    s = summary(path)
    assert s["int8_convs"] == s["convs"] - 1  # every convolution but the DFL's fixed one
    assert qdq_counts(path)["QuantizeLinear"] > 2 * s["int8_convs"] - 1


def test_onnxruntime_matches_fake_quant_pytorch():
    x = kit.images(2)
    y_torch = _fake_quant_output(x)
    y_ort = load_backend("onnxruntime", kit.onnx_path("qat"))(x)
    assert y_ort.shape == y_torch.shape == (2, 4 + kit.NC, 84)
    _assert_close(y_ort, y_torch)


def _assert_close(y, ref):
    """Same numbers up to float rounding: x / scale (ONNX) and x * (1 / scale) (torch) can round an
    activation lying on a .5 boundary to neighbouring steps, and such a one-step flip spreads a
    little through the layers after it; anything systematic (a wrong scale, zero point or clamp)
    is orders of magnitude larger."""
    d = (y - ref).abs()
    assert d[:, 4:].max() < 0.03 and d[:, 4:].mean() < 1e-3  # class scores
    assert d[:, :4].max() < 0.5 and d[:, :4].mean() < 0.02  # boxes, pixels of a 64 px image


def test_seven_bit_weights_export_exactly():
    path = kit.onnx_path("qat_w7")
    assert lint(path) == []
    assert max(weight_levels(onnx.load(str(path))).values()) <= 64
    x = kit.images(2)
    y = load_backend("onnxruntime", path)(x)
    ref = _fake_quant_output(x, weight_bits=7)
    _assert_close(y, ref)


def test_end2end_onnx_nms_matches_pytorch_nms():
    x = kit.images(2)
    det = torch.from_numpy(kit.run_ort(kit.onnx_path("e2e_onnx"), x))
    per_image = [det[det[:, 0] == i][:, 1:] for i in range(len(x))]
    assert det.shape[1] == 7 and len(det) > 2  # the test model does detect something
    # the NMS in the graph = utils.general.non_max_suppression on the same raw predictions
    raw = load_backend("onnxruntime", kit.onnx_path("qat"))(x)
    kit.assert_same_detections(per_image, non_max_suppression(raw, 0.25, 0.45, max_det=100), min_iou=0.99,
                               conf_tol=1e-4)
    # and the same detections as PyTorch fake-quant + NMS
    ref = non_max_suppression(_fake_quant_output(x), 0.25, 0.45, max_det=100)
    kit.assert_same_detections(per_image, ref, min_iou=0.95, conf_tol=0.01)


def test_end2end_tensorrt_writes_the_efficient_nms_plugin():
    # structure only: TensorRT itself is exercised in test_deploy.py where it is installed
    m = onnx.load(str(kit.onnx_path("e2e_trt")))
    nms = [n for n in m.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nms) == 1 and nms[0].domain == "TRT"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nms[0].attribute}
    assert attrs["max_output_boxes"] == 50 and attrs["background_class"] == -1 and attrs["box_coding"] == 0
    assert abs(attrs["iou_threshold"] - 0.45) < 1e-6 and abs(attrs["score_threshold"] - 0.25) < 1e-6
    assert [o.name for o in m.graph.output] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [6, 1, 1, 6]  # int32, float, float, int32
    assert metadata(m)["end2end"] == "tensorrt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from qat.checkpoint import save_qat
    from utils.torch_utils import save_atomic

    d = tmp_path_factory.mktemp("ckpt")
    save_qat(d / "qat_best.pt", kit.qat_model())
    save_atomic({"model": kit.fp32_model(), "epoch": -1}, d / "plain.pt")
    return d


def test_export_qat_cli_no_last_layer_leaves_head_float(checkpoints):
    import export_qat

    r = export_qat.run(weights=checkpoints / "qat_best.pt", imgsz=[kit.IMGSZ], no_last_layer=True)
    path = checkpoints / "qat_best.onnx"
    assert r["path"] == str(path) and r["qat"] and r["lint"] == [] and r["qdq"]["QuantizeLinear"] > 0
    assert r["graph"]["scale_changes"] == []  # trained with the rules: the pass changes no scale
    graph = import_graph(path)
    head = [n for n in graph.nodes if n.op == "Conv" and module_name(n).startswith("model.12.")]
    body = [n for n in graph.nodes if n.op == "Conv" and not module_name(n).startswith("model.12.")]
    assert len(head) == 19 and body
    dq = lambda t: bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"  # noqa: E731
    assert not any(dq(n.inputs[0]) or dq(n.inputs[1]) for n in head)
    assert all(dq(n.inputs[0]) and dq(n.inputs[1]) for n in body)
    assert any(re.search(p, "model.12.cv2.0.0.conv") for p in metadata(path)["float_layers"])
    # the same file linted as if the head had to be quantized: every float head conv is reported
    assert len(lint(path, float_layers=[])) == 18 and lint(path) == []
    full = kit.onnx_path("qat")
    assert sum("should stay float" in v for v in lint(full, float_layers=[r"^model\.12\."])) == 18


def test_export_qat_cli_plain_checkpoint_exports_fp32(checkpoints):
    import export_qat

    r = export_qat.run(weights=checkpoints / "plain.pt", imgsz=[kit.IMGSZ])
    assert not r["qat"] and r["qdq"] == {"QuantizeLinear": 0, "DequantizeLinear": 0}
    assert metadata(r["path"])["qat"] == 0


def test_export_qat_bad_input(checkpoints, capsys):
    import export_qat

    with pytest.raises(UserError, match="already ONNX"):
        export_qat.run(weights=checkpoints / "qat_best.onnx")
    with pytest.raises(UserError, match="not found"):
        export_qat.run(weights=checkpoints / "missing.pt")
    with pytest.raises(SystemExit) as e:
        export_qat.main(["--weights", str(checkpoints / "plain.pt"), "--imgsz", "65"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --imgsz 65")


def test_export_qat_never_replaces_a_good_file_with_a_rejected_one(checkpoints, monkeypatch):
    """Interrupted in the graph pass (Ctrl-C / kill mid-export) or rejected by lint: the previous good
    file keeps the final name and no temporary file is left."""
    import export_qat
    import qat.graph
    import qat.lint

    good = export_qat.run(weights=checkpoints / "qat_best.pt", imgsz=[kit.IMGSZ])
    path = Path(good["path"])
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(qat.graph, "merge_duplicate_pairs", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_qat.run(weights=checkpoints / "qat_best.pt", imgsz=[kit.IMGSZ])
    assert path.read_bytes() == before

    with monkeypatch.context() as mp:
        mp.setattr(qat.lint, "lint", lambda p, **kw: [f"{p}: scale 0 is not positive and finite"])
        with pytest.raises(UserError, match="1 Q/DQ rule violation.*not written.*previous file is kept"):
            export_qat.run(weights=checkpoints / "qat_best.pt", imgsz=[kit.IMGSZ])
    assert path.read_bytes() == before
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
