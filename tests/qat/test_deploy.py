"""qat.deploy: the common backend (static batch fitting), ONNX Runtime reference, TensorRT (run only
where tensorrt and a GPU exist), backend selection and errors. OpenVINO and the CPU flags:
tests/qat/deploy/."""
import pytest
import torch

import qat_testkit as kit
from qat.deploy import ONNXRuntimeBackend, load_backend, require_qdq, resolve_backend, tensorrt_available
from utils.general import UserError


@pytest.fixture(scope="module")
def reference():
    x = kit.images(2)
    return x, load_backend("onnxruntime", kit.onnx_path("qat"))(x)


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


@pytest.mark.skipif(not tensorrt_available()[0], reason="needs the tensorrt package and an NVIDIA GPU")
def test_tensorrt_engine_matches_onnxruntime(reference, tmp_path):
    x, ref = reference
    path = kit.onnx_path("qat", tmp_path)
    backend = load_backend("tensorrt", path)
    assert (tmp_path / "qat.engine").is_file() and (tmp_path / "qat.timing.cache").is_file()
    kit.assert_same_nms(backend(x), ref)
