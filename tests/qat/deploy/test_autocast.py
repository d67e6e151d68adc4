"""qat.deploy.autocast: ModelOpt AutoCast on real exports, on the CPU (its reference run uses the
ONNX Runtime CPU provider; no onnxruntime-gpu needed)."""
import importlib.util
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qat.deploy.autocast import fp16_onnx
from qat.graph import metadata
from tests.qat import qat_testkit as tk

FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def _convert(kind, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fp16_onnx(tk.onnx_path(kind), tmp_path / f"{kind}.fp16.onnx", **kw)


def _qdq_scales(path):
    m = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"})
    return {n.name: values[n.input[1]] for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}


def _conv_output_types(path):
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.output)}
    return [types.get(n.output[0]) for n in m.graph.node if n.op_type == "Conv"]


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return _convert("qat", tmp_path_factory.mktemp("autocast"))


def test_qdq_scales_bit_identical_and_float_layers_fp16(converted):
    before, after = _qdq_scales(tk.onnx_path("qat")), _qdq_scales(converted)
    assert len(before) == len(after) > 100
    for name, s in before.items():
        assert after[name].dtype == np.float32 and after[name].tobytes() == s.tobytes(), name
    types = _conv_output_types(converted)
    assert types and all(t == FP16 for t in types)  # every convolution computes in FP16 (or INT8 via Q/DQ)
    m = onnx.load(str(converted))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [FP32]  # I/O stay FP32
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [FP32]
    assert metadata(converted)["names"] == metadata(tk.onnx_path("qat"))["names"]


def test_converted_model_computes_the_same_detections(converted):
    x = tk.images(2).numpy()
    y0, y1 = _run(tk.onnx_path("qat"), x), _run(converted, x)
    assert y1.shape == y0.shape and y1.dtype == np.float32
    boxes = np.abs(y1[:, :4] - y0[:, :4]).max() / np.abs(y0[:, :4]).max()
    assert boxes < 0.02 and np.abs(y1[:, 4:] - y0[:, 4:]).max() < 0.05


def test_fp16_scale_form_rounds_every_scale(tmp_path):
    out = _convert("qat", tmp_path, qdq_scales="fp16")
    before, after = _qdq_scales(tk.onnx_path("qat")), _qdq_scales(out)
    for name, s in before.items():
        assert after[name].dtype == np.float16
        assert np.array_equal(after[name], s.astype(np.float16)), name


def test_float_export_becomes_fp16_baseline(tmp_path):
    out = _convert("fp32", tmp_path)
    assert all(t == FP16 for t in _conv_output_types(out))
    m = onnx.load(str(out))
    conv_weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    assert all(i.data_type == FP16 for i in m.graph.initializer if i.name in conv_weights)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed")
def test_plugin_graph_needs_tensorrt_one_line(tmp_path):
    from qat.compat import UserError

    with pytest.raises(UserError, match="EfficientNMS_TRT.*needs the tensorrt package"):
        _convert("e2e_trt", tmp_path)
