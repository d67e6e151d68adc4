"""Run an exported (Q/DQ or FP32) ONNX on a deployment runtime, as a drop-in for the PyTorch model.

    backend = load_backend("openvino", "qat_best.onnx")       # or "onnxruntime", "tensorrt", "auto"
    y = backend(images)                                       # (B, 4+nc, anchors), like the eval model
    val.run(data, model=backend, dataloader=loader)           # mAP through the same code as PyTorch

Backends:
- openvino (the CPU default): compiles a copy of the graph in which every activation Q/DQ pair is
  rewritten to the numerically identical uint8 form (zero point 128; DESIGN.md section 5) so the CPU
  plugin runs every quantized convolution in u8. On x86 processors without VNNI / AMX (read from
  /proc/cpuinfo: avx512_vnni, avx_vnni, amx_int8) its kernels saturate with full-range int8
  weights; there the weights must be 7-bit: a model trained with --weight-bits 7 already is, any
  other is re-quantized to 7 bits with a warning (accuracy may drop). `vnni=True/False` overrides
  the detection. Float layers run in f32 (INFERENCE_PRECISION_HINT), so results do not depend on
  whether the CPU has bf16.
- onnxruntime: the numerical reference. Graph optimizations stay at the basic level so Q/DQ run
  as written (no fused integer kernels): the output is the fake-quant model's output.
- tensorrt: engine built with the TensorRT Python API from the Q/DQ ONNX (explicit quantization:
  scales come from the Q/DQ nodes, no calibrator), FP16 allowed for float layers, an optimization
  profile for a dynamic batch, a timing cache, the engine saved beside the ONNX. Needs the
  `tensorrt` package and an NVIDIA GPU; without them it stops with a one-line message.

Each backend is an nn.Module with `stride`, `names`, `nc`, so val.py and NMS treat it like the
model. A static-shape file gets its batch padded (and split) and its images padded at the
bottom/right with grey (letterbox colour) up to the exported size, which leaves box coordinates
unchanged.
"""
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qat.compat import UserError
from qat.graph import (activations_to_uint8, load_model, metadata, qdq_counts, requantize_weights, weight_levels)

BACKENDS = ("openvino", "onnxruntime", "tensorrt")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
PAD_VALUE = 114 / 255  # letterbox grey


def log(msg):
    from utils.general import LOGGER

    LOGGER.info(msg)


# --------------------------------------------------------------------------------------------------
# Processor features


def cpu_int8_features(cpuinfo="/proc/cpuinfo"):
    """{'vnni': True/False/None, 'flags': [VNNI/AMX flags found], 'source': where it was read}.
    None means unknown (not Linux/x86); callers then keep 8-bit weights and say so."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return {"vnni": None, "flags": [], "source": f"{machine} processor (not x86: no u8 x s8 saturation issue known)"}
    try:
        text = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return {"vnni": None, "flags": [], "source": f"{cpuinfo} unreadable"}
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    found = [f for f in VNNI_FLAGS if f in flags]
    return {"vnni": bool(found), "flags": found, "source": str(cpuinfo)}


def _static(dim):
    return dim if isinstance(dim, int) and dim > 0 else None


# --------------------------------------------------------------------------------------------------
# Common wrapper


class Backend(nn.Module):
    """Common part: metadata (stride, names), input fitting, timing. Subclasses implement
    `_infer(x: np.ndarray float32 (B,3,H,W)) -> np.ndarray (B, 4+nc, A)`."""
    name = "backend"

    def __init__(self, path, names=None, strides=None, meta=None):
        super().__init__()
        self.path = Path(path)
        meta = dict(meta or {})
        if meta.get("end2end"):
            raise UserError(f"{self.path.name} has NMS inside the graph (--end2end); validation needs the raw "
                            f"output: export again without --end2end")
        strides = strides or meta.get("strides") or meta.get("stride") or [8, 16, 32]
        if isinstance(strides, (int, float)):  # export.py writes the largest stride only
            strides = [int(strides) // 4, int(strides) // 2, int(strides)]
        self.stride = torch.tensor([float(s) for s in strides])
        names = names if names is not None else meta.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=lambda k: int(k))]
        self.names = list(names or [])
        self.nc = None  # set from the output shape
        self.meta = meta
        self.batch, self.height, self.width = None, None, None  # static dims when the file has them
        self.times = []  # seconds per call of the runtime
        # val.run (ours and upstream's) takes the device from next(model.parameters()): the host
        self.register_parameter("_host", nn.Parameter(torch.zeros(0), requires_grad=False))

    # input fitting -----------------------------------------------------------------------------
    def _fit(self, im):
        """im float (B,3,h,w) -> list of (array to run, number of real images in it)."""
        x = im.detach().float().cpu()
        b, _, h, w = x.shape
        H, W = self.height or h, self.width or w
        if h > H or w > W:
            raise UserError(f"images of {h}x{w} do not fit the {self.path.name} input of {H}x{W}: "
                            f"use --imgsz {max(H, W)} (or export with --dynamic)")
        if (h, w) != (H, W):
            x = torch.nn.functional.pad(x, (0, W - w, 0, H - h), value=PAD_VALUE)
        if not self.batch:
            return [(x.numpy(), b)]
        chunks = []
        for i in range(0, b, self.batch):
            c = x[i:i + self.batch]
            n = c.shape[0]
            if n < self.batch:
                c = torch.cat((c, c.new_zeros((self.batch - n, *c.shape[1:]))))
            chunks.append((np.ascontiguousarray(c.numpy()), n))
        return chunks

    def forward(self, im, augment=False, **kwargs):
        """(B, 4+nc, anchors) on the host; `augment` (upstream val passes it) is not supported."""
        outs = []
        for x, n in self._fit(im):
            t0 = time.perf_counter()
            y = self._infer(x)
            self.times.append(time.perf_counter() - t0)
            outs.append(torch.from_numpy(np.asarray(y, dtype=np.float32)[:n]))
        y = torch.cat(outs)
        if self.nc is None:
            self.nc = y.shape[1] - 4
            if len(self.names) < self.nc:
                self.names += [str(i) for i in range(len(self.names), self.nc)]
        return y

    def latency_ms(self):
        """Median milliseconds per runtime call so far."""
        return float(np.median(self.times) * 1e3) if self.times else float("nan")

    def describe(self):
        return f"{self.name} ({self.path.name})"


def _onnx_meta(path):
    try:
        return metadata(path)
    except UserError:
        raise
    except Exception:
        return {}


def require_qdq(path):
    """UserError when an ONNX that should be a QAT export has no Q/DQ nodes."""
    counts = qdq_counts(path)
    if counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 0:
        raise UserError(f"'{path}' has no QuantizeLinear/DequantizeLinear nodes: it is a float ONNX, not a QAT "
                        f"export; export the QAT checkpoint with export_qat.py")
    return counts


# --------------------------------------------------------------------------------------------------
# OpenVINO


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
        meta = _onnx_meta(path) if model is None else metadata(model)
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
            self.batch, self.height, self.width = _static(dims[0]), _static(dims[2]), _static(dims[3])
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
# ONNX Runtime


class ONNXRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, path, threads=None, reference=True, names=None, strides=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from None
        super().__init__(path, names, strides, _onnx_meta(path))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if reference:  # the graph run as written: even ORT_ENABLE_BASIC removes and moves Q/DQ nodes
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = (str(e).strip().splitlines() or ["?"])[0][:200]
            raise UserError(f"ONNX Runtime could not load {self.path.name}: {first}") from None
        inp = self.session.get_inputs()[0]
        self._in = inp.name
        dims = list(inp.shape)
        if len(dims) == 4:
            self.batch, self.height, self.width = (_static(dims[0]), _static(dims[2]), _static(dims[3]))
        outs = [o.name for o in self.session.get_outputs()]
        self._out = "output0" if "output0" in outs else outs[0]

    def _infer(self, x):
        return self.session.run([self._out], {self._in: x})[0]


# --------------------------------------------------------------------------------------------------
# TensorRT


def tensorrt_available():
    """(True, '') or (False, why): the tensorrt package and a CUDA GPU are both needed."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install tensorrt)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available"
    return True, ""


def _trt():
    ok, why = tensorrt_available()
    if not ok:
        raise UserError(f"backend 'tensorrt' is not available here: {why}; use --backend openvino (CPU)")
    import tensorrt as trt

    return trt


def build_engine(onnx_path, engine_path=None, fp16=True, workspace_gb=4.0, min_batch=1, opt_batch=None,
                 max_batch=None, timing_cache=None, imgsz=None):
    """Build a TensorRT engine from a Q/DQ (or float) ONNX with the TensorRT Python API and save it.

    Explicit quantization: TensorRT takes the scales from the Q/DQ nodes (no calibrator); INT8 and
    (for the float layers, e.g. the --no-last-layer head) FP16 are enabled. A dynamic batch gets one
    optimization profile min/opt/max. The timing cache file is read when it exists and written back,
    so later builds are faster. Returns the engine path (default: the ONNX path with .engine)."""
    trt = _trt()
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    timing_cache = Path(timing_cache) if timing_cache else onnx_path.with_suffix(".timing.cache")
    meta = _onnx_meta(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 10+: every network is explicit-batch
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:300]
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag, wanted in (("INT8", True), ("FP16", fp16)):
        if wanted and hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        elif wanted:
            log(f"TensorRT {trt.__version__}: no BuilderFlag.{flag} (strongly typed only); "
                f"layers run in the ONNX's own precision")

    h, w = (meta.get("imgsz") or [None, None]) if imgsz is None else \
        ((imgsz, imgsz) if isinstance(imgsz, int) else imgsz)
    dynamic = False
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if all(d > 0 for d in shape):
            continue
        dynamic = True
        fixed = [shape[1] if shape[1] > 0 else 3, shape[2] if shape[2] > 0 else h, shape[3] if shape[3] > 0 else w]
        if None in fixed:
            raise UserError(f"{onnx_path.name} has dynamic height/width and no recorded --imgsz: pass imgsz")
        mx = max_batch or max(int(meta.get("batch") or 1), 32)
        opt = opt_batch or min(8, mx)
        profile.set_shape(inp.name, (min_batch, *fixed), (opt, *fixed), (mx, *fixed))
    if dynamic:
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"TensorRT {trt.__version__}: building {engine_path.name} from {onnx_path.name} "
        f"(INT8{' + FP16' if fp16 else ''}{', dynamic batch' if dynamic else ''})...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    _write_atomic(engine_path, bytes(serialized))
    _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    import json

    _write_atomic(engine_path.with_suffix(".json"), json.dumps(meta).encode())  # strides, names for the engine
    return engine_path


def _write_atomic(path, data):
    from qat.compat import atomic_output

    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path, engine=None, fp16=True, names=None, strides=None, rebuild=False, **build_kw):
        """path: an ONNX (the engine is built beside it, or reused when newer) or an .engine file."""
        trt = _trt()
        import json

        path = Path(path)
        if path.suffix == ".engine":
            engine = path
            side = path.with_suffix(".json")
            meta = json.loads(side.read_text()) if side.is_file() else {}
        else:
            meta = _onnx_meta(path)
            engine = Path(engine) if engine else path.with_suffix(".engine")
            if rebuild or not engine.is_file() or engine.stat().st_mtime < path.stat().st_mtime:
                build_engine(path, engine, fp16=fp16, **build_kw)
        super().__init__(path, names, strides, meta)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load {engine} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda")
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in io if n not in self._inputs]
        self._out = "output0" if "output0" in outs else outs[0]
        self._outs = outs
        dims = list(self.engine.get_tensor_shape(self._inputs[0]))
        self.batch, self.height, self.width = _static(dims[0]), _static(dims[2]), _static(dims[3])
        self._dtypes = {n: torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                        for n in io}

    def _infer(self, x):
        xin = torch.from_numpy(x).to(self.device, self._dtypes[self._inputs[0]]).contiguous()
        self.context.set_input_shape(self._inputs[0], tuple(xin.shape))
        self.context.set_tensor_address(self._inputs[0], xin.data_ptr())
        outs = {}
        for n in self._outs:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = torch.empty(shape, device=self.device, dtype=self._dtypes[n])
            self.context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outs[self._out].float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Selection


def resolve_backend(name):
    """'auto' -> tensorrt when importable and a GPU exists, else openvino; checks the name."""
    name = (name or "auto").lower()
    if name not in BACKENDS + ("auto",):
        raise UserError(f"unknown backend '{name}': use one of auto, {', '.join(BACKENDS)}")
    if name == "auto":
        return "tensorrt" if tensorrt_available()[0] else "openvino"
    return name


def load_backend(name, path, threads=None, vnni=None, uint8=True, names=None, strides=None, **kw):
    """Backend `name` (auto | openvino | onnxruntime | tensorrt) for the ONNX (or engine) at `path`."""
    name = resolve_backend(name)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file '{path}' not found; check the path")
    if path.suffix == ".engine" and name != "tensorrt":
        raise UserError(f"'{path.name}' is a TensorRT engine: use --backend tensorrt (or pass the ONNX)")
    if name == "openvino":
        return OpenVINOBackend(path, threads=threads, vnni=vnni, uint8=uint8, names=names, strides=strides, **kw)
    if name == "onnxruntime":
        return ONNXRuntimeBackend(path, threads=threads, names=names, strides=strides, **kw)
    return TensorRTBackend(path, names=names, strides=strides, **kw)
