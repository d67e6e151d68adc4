"""Run an exported (Q/DQ or FP32) ONNX on a deployment runtime, as a drop-in for the PyTorch model.

    backend = load_backend("openvino", "qat_best.onnx")       # or "onnxruntime", "tensorrt", "auto"
    y = backend(images)                                       # (B, 4+nc, anchors), like the eval model
    val.run(data, model=backend, dataloader=loader)           # mAP through the same code as PyTorch

One module per runtime (`openvino`, `onnxruntime`, `tensorrt`), each importable alone and importing
its runtime package only when a backend is made; `base` holds the common wrapper, `cpu` the processor
flags. This file only picks one.
"""
from pathlib import Path

from qat.compat import UserError
from qat.deploy.base import Backend, require_qdq
from qat.deploy.cpu import cpu_int8_features
from qat.deploy.onnxruntime import ONNXRuntimeBackend
from qat.deploy.openvino import OpenVINOBackend, choose_form, compressed_ir, export_ir
from qat.deploy.tensorrt import TensorRTBackend, build_engine, tensorrt_available

BACKENDS = ("openvino", "onnxruntime", "tensorrt")
__all__ = ["BACKENDS", "Backend", "ONNXRuntimeBackend", "OpenVINOBackend", "TensorRTBackend", "build_engine",
           "choose_form", "compressed_ir", "cpu_int8_features", "export_ir", "load_backend", "require_qdq", "resolve_backend",
           "tensorrt_available"]


def resolve_backend(name):
    """'auto' -> tensorrt when importable and a GPU exists, else openvino; checks the name."""
    name = (name or "auto").lower()
    if name not in BACKENDS + ("auto",):
        raise UserError(f"unknown backend '{name}': use one of auto, {', '.join(BACKENDS)}")
    if name == "auto":
        return "tensorrt" if tensorrt_available()[0] else "openvino"
    return name


def load_backend(name, path, threads=None, vnni=None, act_form="auto", names=None, strides=None, **kw):
    """Backend `name` (auto | openvino | onnxruntime | tensorrt) for the ONNX (or engine, or OpenVINO
    IR folder) at `path`."""
    name = resolve_backend(name)
    path = Path(path)
    if path.is_dir() and name == "openvino":
        return OpenVINOBackend(path, threads=threads, vnni=vnni, act_form=act_form, names=names, strides=strides, **kw)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder (an OpenVINO IR?): use --backend openvino, or pass the ONNX")
    if not path.is_file():
        raise UserError(f"model file '{path}' not found; check the path")
    if path.suffix == ".engine" and name != "tensorrt":
        raise UserError(f"'{path.name}' is a TensorRT engine: use --backend tensorrt (or pass the ONNX)")
    if name == "openvino":
        return OpenVINOBackend(path, threads=threads, vnni=vnni, act_form=act_form, names=names, strides=strides, **kw)
    if name == "onnxruntime":
        return ONNXRuntimeBackend(path, threads=threads, names=names, strides=strides, **kw)
    return TensorRTBackend(path, names=names, strides=strides, **kw)
