"""OpenVINO, the CPU default.

Compiles a copy of the graph in which every activation Q/DQ pair is rewritten to the numerically
identical uint8 form (zero point 128; DESIGN.md section 5) so the CPU plugin runs every quantized
convolution in u8. On x86 processors without VNNI / AMX (`qat.deploy.cpu`) its kernels saturate with
full-range int8 weights; there the weights must be 7-bit: a model trained with --weight-bits 7 already
is, any other is re-quantized to 7 bits with a warning (accuracy may drop). `vnni=True/False`
overrides the detection. Float layers run in f32 (INFERENCE_PRECISION_HINT), so results do not depend
on whether the CPU has bf16.

The two graph rewrites live here, not in qat.graph: they exist only for this runtime and work on a
copy; the TensorRT-shaped file stays as it is.
"""
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qat.compat import UserError
from qat.deploy.base import Backend, log, onnx_meta, static_dim
from qat.deploy.cpu import cpu_int8_features
from qat.graph import QDQ_OPS, constants_to_initializers, load_model, metadata, qdq_counts


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, path, threads=None, uint8=True, vnni=None, device="CPU", precision="f32", names=None,
                 strides=None, model=None, input_shape=None, hint="LATENCY"):
        """model: an onnx.ModelProto to use instead of reading `path`; vnni: None = detect;
        input_shape: (B, 3, H, W) to fix a dynamic-shape file to (OpenVINO then folds the shape math)."""
        try:
            import openvino as ov
        except ImportError:
            raise UserError("backend 'openvino' needs the openvino package: pip install openvino") from None
        meta = onnx_meta(path) if model is None else metadata(model)
        super().__init__(path, names, strides, meta)
        onnx_model = load_model(model if model is not None else path)
        counts = qdq_counts(onnx_model)
        self.quantized = counts["QuantizeLinear"] + counts["DequantizeLinear"] > 0
        cpu = cpu_int8_features()
        self.cpu = cpu
        self.vnni = cpu["vnni"] if vnni is None else bool(vnni)
        self.uint8_rewritten = activations_to_uint8(onnx_model) if (self.quantized and uint8) else 0
        self.weights_requantized = []
        self.weight_max_q = max(weight_levels(onnx_model).values(), default=0) if self.quantized else 0
        if self.quantized:
            where = "override" if vnni is not None else cpu["source"]
            if self.vnni is None:
                log(f"OpenVINO: VNNI/AMX unknown ({cpu['source']}); keeping {self.weight_max_q}-level weights")
            elif self.vnni:
                log(f"OpenVINO: processor has {'/'.join(cpu['flags']) or 'VNNI (override)'}: 8-bit weights run as they are")
            elif self.weight_max_q <= 64:
                log(f"OpenVINO: no VNNI/AMX ({where}); weights are already 7-bit (|q| <= {self.weight_max_q})")
            else:
                self.weights_requantized = requantize_weights(onnx_model, 7)
                warnings.warn(f"this processor has no VNNI/AMX ({where}): OpenVINO's int8 kernels would saturate "
                              f"with 8-bit weights, so {len(self.weights_requantized)} weight tensors were "
                              f"re-quantized to 7 bits; accuracy may drop. Train with --weight-bits 7 for these "
                              f"CPUs, or pass vnni=True (--vnni yes) to keep 8-bit weights", stacklevel=2)
        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:  # OpenVINO reads ONNX from a file
            import onnx

            f = Path(tmp) / "model.onnx"
            onnx.save(onnx_model, str(f))
            self.ov_model = core.read_model(str(f))
        if input_shape is not None:
            self.ov_model.reshape({self.ov_model.inputs[0].get_any_name(): list(input_shape)})
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.threads, self.precision = threads, precision
        try:
            self.compiled = core.compile_model(self.ov_model, device, config)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["?"])[0][:200]
            raise UserError(f"OpenVINO could not compile {self.path.name} for {device}: {first}") from None
        shape = self.compiled.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if len(dims) == 4:
            self.batch, self.height, self.width = static_dim(dims[0]), static_dim(dims[2]), static_dim(dims[3])
        outs = [o for o in self.compiled.outputs if "output0" in o.get_names()]
        self._out = outs[0] if outs else self.compiled.outputs[0]
        self._request = self.compiled.create_infer_request()

    def _infer(self, x):
        self._request.infer({0: x})
        return self._request.get_tensor(self._out).data.copy()

    def conv_precisions(self):
        """{'int8': n, 'float': n, 'total': n} of the convolutions in the compiled (runtime) model:
        rt_info runtimePrecision u8/i8 = INT8 kernel."""
        int8 = flt = 0
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or "onvolution" not in str(info["layerType"].astype(str)):
                continue
            prec = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else ""
            if prec in ("u8", "i8"):
                int8 += 1
            else:
                flt += 1
        return {"int8": int8, "float": flt, "total": int8 + flt}

    def save_ir(self, xml_path):
        """Write the deployed model as OpenVINO IR (.xml + .bin, weights stored as int8); returns the
        .bin size in MB."""
        import openvino as ov

        xml_path = Path(xml_path)
        xml_path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(compressed_ir(self.ov_model), str(xml_path), compress_to_fp16=False)
        return xml_path.with_suffix(".bin").stat().st_size / (1 << 20)

    def describe(self):
        bits = "re-quantized to 7 bits" if self.weights_requantized else f"up to ±{self.weight_max_q}"
        vnni = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[self.vnni]
        extra = f", u8 activations, weights {bits}, {vnni}" if self.quantized else ""
        return f"openvino {self.precision}{extra} ({self.path.name})"


def compressed_ir(ov_model):
    """A copy whose quantized float weights are stored as int8 constants (what OpenVINO's model
    converter does for FakeQuantize weights): same outputs, a quarter of the size."""
    from openvino._offline_transformations import compress_quantize_weights_transformation

    m = ov_model.clone()
    compress_quantize_weights_transformation(m)
    return m


# --------------------------------------------------------------------------------------------------
# Graph rewrites for this runtime (on a copy of the graph)


def _initializers(model):
    return {t.name: t for t in model.graph.initializer}


def activations_to_uint8(model):
    """Rewrite every activation Q/DQ pair (per-tensor, int8, zero point 0) to uint8 with zero point
    128, in place. Same scale: q_u8 = q_i8 + 128 over the same range, so the values are identical
    (lossless); OpenVINO's CPU plugin then runs every convolution in u8 (DESIGN.md section 5).
    Returns the number of Q/DQ nodes rewritten."""
    constants_to_initializers(model)
    inits = _initializers(model)
    name = "qat_activation_zero_point_u8"
    n = 0
    q_outputs = set()
    weight_q_outputs = {x.output[0] for x in model.graph.node if x.op_type == "QuantizeLinear" and x.input[0] in inits}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            continue  # a weight
        if node.op_type == "DequantizeLinear" and node.input[0] in weight_q_outputs:
            continue  # a weight's DQ (also a per-tensor one: its Q stays int8)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            continue  # a pre-quantized weight
        scale = numpy_helper.to_array(inits[node.input[1]])
        if scale.size != 1:
            continue
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            continue
        if name not in inits:
            t = numpy_helper.from_array(np.array(128, dtype=np.uint8), name)
            model.graph.initializer.append(t)
            inits[name] = t
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        if node.op_type == "QuantizeLinear":
            q_outputs.add(node.output[0])
        n += 1
    for vi in list(model.graph.value_info) + list(model.graph.output):  # recorded types follow: int8 -> uint8
        if vi.name in q_outputs and vi.type.tensor_type.elem_type == onnx.TensorProto.INT8:
            vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return n


def _weight_pairs(model):
    """[(Q node, DQ node)] of weights: QuantizeLinear of an initializer followed by a DequantizeLinear."""
    inits = _initializers(model)
    consumers = defaultdict(list)
    for node in model.graph.node:
        for t in node.input:
            consumers[t].append(node)
    out = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            dqs = [c for c in consumers[node.output[0]] if c.op_type == "DequantizeLinear"]
            out += [(node, dq) for dq in dqs]
    return out


def weight_levels(model):
    """{weight name: largest |q|} of every Q/DQ-quantized weight (127 = full int8, <= 64 = 7-bit)."""
    constants_to_initializers(model)
    inits = _initializers(model)
    out = {}
    for q, _ in _weight_pairs(model):
        w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        axis = q.attribute[0].i if q.attribute else 1
        if s.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        out[q.input[0]] = int(np.abs(np.rint(w / s)).max()) if w.size else 0
    return out


def requantize_weights(model, bits=7):
    """Weights whose integer values exceed `bits` (|q| > 2^(bits-1)) -> the same range on a
    `bits` grid: scale * 127 / (2^(bits-1) - 1), in place. Returns the names re-quantized.

    Why: on x86 CPUs without VNNI/AMX, OpenVINO's u8 x s8 kernels add pairs of products in 16 bits
    and saturate with full-range int8 weights (DESIGN.md section 5). Post-training this costs
    accuracy; a model trained with --weight-bits 7 needs no change (and gets none)."""
    constants_to_initializers(model)
    inits = _initializers(model)
    top = 2 ** (bits - 1) - 1
    done = []
    levels = weight_levels(model)
    for q, dq in _weight_pairs(model):
        if levels.get(q.input[0], 0) <= top + 1:
            continue
        s = numpy_helper.to_array(inits[q.input[1]])
        new = (s.astype(np.float64) * 127.0 / top).astype(s.dtype)
        name = q.input[1] + f"_w{bits}"
        if name not in inits:
            t = numpy_helper.from_array(new, name)
            model.graph.initializer.append(t)
            inits[name] = t
        q.input[1] = name
        dq.input[1] = name
        done.append(q.input[0])
    return sorted(set(done))

