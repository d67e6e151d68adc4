"""FP16 float layers for a strongly typed TensorRT network (TensorRT 11 has no BuilderFlag.FP16):
NVIDIA ModelOpt AutoCast (`modelopt.onnx.autocast`) rewrites the ONNX so the float layers are FP16.

    path = fp16_onnx("qat_best.onnx")            # -> qat_best.fp16.onnx (Q/DQ and scales as they were)

Two forms of the Q/DQ nodes (`qdq_scales`):
- "fp32" (default): QuantizeLinear/DequantizeLinear are excluded from the conversion, so every scale
  stays bit-identical to the trained one (deployed == trained); AutoCast puts a Cast to FP16 after
  each DequantizeLinear and a Cast to FP32 before each QuantizeLinear.
- "fp16": AutoCast converts the scales too (what `modelopt.onnx.quantization` does for
  `high_precision_dtype='fp16'`): fewer Casts, but every scale is rounded to FP16 (relative change
  up to 2^-11; scales below FP16's normal range lose more).
Which form TensorRT 11 fuses better can only be measured on a GPU (scripts/gpu_check.sh).
Input and output stay FP32 (`keep_io_types`), so the engine's I/O is that of the FP32 export.
AutoCast needs modelopt's ONNX extras (onnxscript, lief, cppimport, onnxconverter-common, polygraphy;
requirements.txt), not onnxruntime-gpu: its reference run uses the CPU provider.
"""
import importlib.util
import warnings
from pathlib import Path

from qat.compat import UserError

QDQ_OPS = ["QuantizeLinear", "DequantizeLinear"]
QDQ_SCALE_FORMS = ("fp32", "fp16")


def _autocast():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise UserError(f"FP16 conversion needs modelopt's ONNX extras ({e}): pip install onnxscript lief "
                        f"cppimport onnxconverter-common polygraphy") from None
    return convert_to_mixed_precision


def fp16_onnx(onnx_path, out_path=None, qdq_scales="fp32"):
    """Write the ONNX with its float layers in FP16 (I/O kept FP32); returns the output path
    (default: `<stem>.fp16.onnx` beside the input). The metadata (names, strides, ...) is kept."""
    import onnx

    from qat.graph import save_onnx

    if qdq_scales not in QDQ_SCALE_FORMS:
        raise UserError(f"qdq_scales '{qdq_scales}' is unknown: use one of {', '.join(QDQ_SCALE_FORMS)}")
    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path else onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
    source = onnx.load(str(onnx_path), load_external_data=False)
    plugins = sorted({n.op_type for n in source.graph.node if n.domain == "TRT"})
    if plugins and importlib.util.find_spec("tensorrt") is None:  # AutoCast asks TensorRT for a plugin's types
        raise UserError(f"{onnx_path.name} has TensorRT plugin nodes ({', '.join(plugins)}): ModelOpt AutoCast needs "
                        f"the tensorrt package to convert it; run this where TensorRT is installed")
    convert = _autocast()
    exclude = QDQ_OPS if qdq_scales == "fp32" else []
    try:
        model = convert(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True,
                        op_types_to_exclude=exclude)
    except Exception as e:  # AutoCast's own errors are assertions and ORT errors: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"ModelOpt AutoCast could not convert {onnx_path.name} to FP16: {first}") from None
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)  # AutoCast drops them; strides/names live there
    save_onnx(model, out_path)
    return out_path
