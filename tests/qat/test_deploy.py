"""qat.deploy: OpenVINO INT8 (u8 form, 7-bit weights without VNNI), ONNX Runtime reference, TensorRT
(run only where tensorrt and a GPU exist), backend selection and errors."""
import warnings

import pytest
import torch

import qat_testkit as kit
from qat.deploy import (ONNXRuntimeBackend, OpenVINOBackend, cpu_int8_features, load_backend, require_qdq,
                        resolve_backend, tensorrt_available)
from qat.lint import summary
from utils.general import UserError, non_max_suppression


@pytest.fixture(scope="module")
def reference():
    x = kit.images(2)
    return x, load_backend("onnxruntime", kit.onnx_path("qat"))(x)


def _same_detections(y, ref, min_iou=0.95):
    a, b = non_max_suppression(y, 0.25, 0.45), non_max_suppression(ref, 0.25, 0.45)
    assert sum(len(d) for d in b) > 2
    kit.assert_same_detections(a, b, min_iou=min_iou)


def test_openvino_runs_every_quantized_conv_in_int8_and_matches_onnxruntime(reference):
    x, ref = reference
    backend = load_backend("openvino", kit.onnx_path("qat"), threads=2, vnni=True)
    y = backend(x)
    counts, s = backend.conv_precisions(), summary(kit.onnx_path("qat"))
    assert counts["total"] == s["convs"] and counts["int8"] == s["int8_convs"] == s["convs"] - 1  # DFL stays float
    assert backend.uint8_rewritten > 0 and backend.weights_requantized == []
    assert y.shape == ref.shape and backend.nc == kit.NC and backend.names == kit.NAMES
    assert (y - ref)[:, 4:].abs().max() < 0.03 and (y - ref)[:, :4].abs().mean() < 0.05
    _same_detections(y, ref)


def test_openvino_without_vnni_uses_seven_bit_weights(reference, tmp_path):
    x, ref = reference
    with pytest.warns(UserWarning, match="re-quantized to 7 bits"):
        b8 = OpenVINOBackend(kit.onnx_path("qat"), threads=2, vnni=False)
    assert b8.weights_requantized and "re-quantized to 7 bits" in b8.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a --weight-bits 7 model needs no change and gets no warning
        b7 = OpenVINOBackend(kit.onnx_path("qat_w7"), threads=2, vnni=False)
    assert b7.weights_requantized == [] and b7.weight_max_q <= 64
    ref7 = load_backend("onnxruntime", kit.onnx_path("qat_w7"))(x)
    _same_detections(b7(x), ref7)
    assert b8.save_ir(tmp_path / "m.xml") < 0.5 * (kit.onnx_path("qat").stat().st_size / (1 << 20))  # int8 weights


def test_cpu_feature_detection(tmp_path, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_int8_features(f) == {"vnni": False, "flags": [], "source": str(f)}
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx_vnni amx_int8\n")
    assert cpu_int8_features(f)["flags"] == ["avx_vnni", "amx_int8"]
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_int8_features(f)["vnni"] is None


def test_static_batch_is_padded_and_split(reference):
    x, ref = reference
    backend = ONNXRuntimeBackend(kit.onnx_path("qat"))  # exported with batch 2
    three = torch.cat((x, x[:1]))
    y = backend(three)
    assert y.shape[0] == 3 and torch.equal(y[:2], ref) and torch.allclose(y[2], ref[0])
    small = backend(x[:, :, :48, :56])  # smaller images: padded bottom/right with letterbox grey
    assert small.shape == ref.shape
    with pytest.raises(UserError, match="do not fit"):
        backend(torch.zeros(1, 3, 96, 96))


def test_backend_selection_and_errors(tmp_path):
    assert resolve_backend("auto") == ("tensorrt" if tensorrt_available()[0] else "openvino")
    with pytest.raises(UserError, match="unknown backend 'tflite'"):
        load_backend("tflite", kit.onnx_path("qat"))
    with pytest.raises(UserError, match="has no QuantizeLinear"):
        require_qdq(kit.onnx_path("fp32"))
    with pytest.raises(UserError, match="NMS inside the graph"):
        load_backend("onnxruntime", kit.onnx_path("e2e_onnx"))
    with pytest.raises(UserError, match="not found"):
        load_backend("openvino", tmp_path / "missing.onnx")
    if not tensorrt_available()[0]:
        with pytest.raises(UserError, match="backend 'tensorrt' is not available here"):
            load_backend("tensorrt", kit.onnx_path("qat"))


def test_fp32_onnx_runs_on_openvino_like_pytorch():
    x = kit.images(2)
    with torch.no_grad():
        ref = kit.export_mode(kit.fp32_model())(x)
    y = load_backend("openvino", kit.onnx_path("fp32"), threads=2)(x)
    assert torch.allclose(y, ref, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not tensorrt_available()[0], reason="needs the tensorrt package and an NVIDIA GPU")
def test_tensorrt_engine_matches_onnxruntime(reference, tmp_path):
    x, ref = reference
    path = kit.onnx_path("qat", tmp_path)
    backend = load_backend("tensorrt", path)
    assert (tmp_path / "qat.engine").is_file() and (tmp_path / "qat.timing.cache").is_file()
    _same_detections(backend(x), ref)
