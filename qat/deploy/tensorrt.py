"""TensorRT: one engine builder for TensorRT 10 and 11, the engine report, and the backend.

    path = build_engine("qat_best.onnx")          # INT8 engine (Q/DQ) + qat_best.report.json/.md
    path = build_engine("best.onnx")              # FP16 baseline from export.py's FP32 ONNX

Explicit quantization: the scales come from the Q/DQ nodes, no calibrator ever runs.
- TensorRT 11 removed weak typing (BuilderFlag.FP16/INT8, calibrators): the network is strongly
  typed and runs each layer in the type the ONNX gives it, so the ONNX is first converted by
  ModelOpt AutoCast (qat.deploy.autocast: float layers FP16, Q/DQ and their scales untouched).
- TensorRT 10 (Jetson): weak typing with BuilderFlag.INT8 (when the file has Q/DQ) and FP16.
The same path builds the FP16 baseline from a float ONNX. The TensorRT API is used directly rather
than polygraphy: polygraphy's CreateConfig exposes fp16/int8 as flags that TensorRT 11 no longer
has, and the two builds differ only in the network flag and two config flags.
An engine is reused only when its `<engine>.build.json` records the same key: a SHA-256 of the
ONNX bytes and the build options (precision mode, shapes, TensorRT version, GPU), never file times.
Every build writes the engine report (qat.deploy.engine_report) beside the engine.
Needs the `tensorrt` package and an NVIDIA GPU; without them it stops with a one-line message.
Untested here (no GPU, no TensorRT): written against the TensorRT 10/11 Python API documentation.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from qat.compat import UserError
from qat.deploy.base import Backend, log, onnx_meta, static_dim
from qat.deploy.engine_report import format_summary, parse_engine_info, read_report, write_report
from qat.deploy.files import MAX_BATCH, OPT_BATCH, has_qdq, onnx_io, resolved_shapes, write_atomic


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


def trt_major(version):
    return int(str(version).split(".")[0])


def strongly_typed(version):
    """TensorRT 11 and later: no weak typing at all."""
    return trt_major(version) >= 11


def _io(onnx_path, imgsz=None):
    """onnx_io, with `imgsz` (int or (h, w)) standing in for a file that records none (export.py's)."""
    io = onnx_io(onnx_path)
    if imgsz:
        io["meta"]["imgsz"] = [int(imgsz), int(imgsz)] if isinstance(imgsz, int) else [int(v) for v in imgsz]
    return io


def build_options(onnx_path, trt_version, gpu="", max_batch=None, opt_batch=None, workspace_gb=4.0,
                  qdq_scales="fp32", imgsz=None):
    """Everything that changes the engine built from one ONNX: part of the reuse key."""
    io = _io(onnx_path, imgsz)
    dynamic = not isinstance(io["inputs"][0]["dims"][0], int) or io["inputs"][0]["dims"][0] <= 0
    mx = int(max_batch or MAX_BATCH) if dynamic else None
    return {"trt": str(trt_version), "gpu": gpu, "int8": has_qdq(onnx_path), "fp16": True,
            "strongly_typed": strongly_typed(trt_version), "qdq_scales": qdq_scales if strongly_typed(trt_version)
            else None, "batch": [1, int(min(opt_batch or OPT_BATCH, mx)), mx] if dynamic else None,
            "workspace_gb": float(workspace_gb), "imgsz": io["meta"].get("imgsz")}


def engine_key(onnx_path, options):
    """SHA-256 of the ONNX bytes and the options (sorted JSON)."""
    h = hashlib.sha256(Path(onnx_path).read_bytes())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def build_record_path(engine_path):
    return Path(engine_path).with_suffix(".build.json")


def reusable(engine_path, key):
    """True when the engine exists and was built from the same ONNX bytes with the same options."""
    rec = build_record_path(engine_path)
    if not Path(engine_path).is_file() or not rec.is_file():
        return False
    try:
        return json.loads(rec.read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def _profile_shapes(network, io, options):
    """{input name: (min, opt, max)} for the inputs with a dynamic axis."""
    out = {}
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if all(d > 0 for d in inp.shape):
            continue
        b = options["batch"] or [int(inp.shape[0])] * 3
        out[inp.name] = tuple(tuple(resolved_shapes(io, n)[inp.name]) for n in b)
    return out


def build_engine(onnx_path, engine_path=None, max_batch=None, opt_batch=None, workspace_gb=4.0, qdq_scales="fp32",
                 rebuild=False, imgsz=None):
    """Build (or reuse) the engine for `onnx_path`; returns the engine path (default: .engine beside it).

    INT8 when the ONNX has Q/DQ nodes, else the FP16 baseline; float layers FP16 either way. `imgsz`:
    the height/width of the profile for a dynamic-size file that does not record it (export.py's)."""
    trt = _trt()
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    options = build_options(onnx_path, trt.__version__, torch.cuda.get_device_name(0), max_batch, opt_batch,
                            workspace_gb, qdq_scales, imgsz)
    key = engine_key(onnx_path, options)
    if not rebuild and reusable(engine_path, key):
        log(f"TensorRT: reusing {engine_path.name} (same ONNX and build options)")
        return engine_path
    source = onnx_path
    if options["strongly_typed"]:
        from qat.deploy.autocast import fp16_onnx

        source = fp16_onnx(onnx_path, engine_path.with_suffix(".fp16.onnx"), qdq_scales=qdq_scales)
    io = _io(onnx_path, imgsz)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if options["strongly_typed"] and flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:300]
        raise UserError(f"TensorRT could not parse {source.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the engine report needs per-layer types
    if not options["strongly_typed"]:  # TensorRT 10: weak typing, precisions allowed by flags
        config.set_flag(trt.BuilderFlag.FP16)
        if options["int8"]:
            config.set_flag(trt.BuilderFlag.INT8)
    profiles = _profile_shapes(network, io, options)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profiles.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    timing_cache = engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    mode = ("INT8 + " if options["int8"] else "") + "FP16" + (" (strongly typed, AutoCast ONNX)"
                                                            if options["strongly_typed"] else " (builder flags)")
    batch = f", batch min/opt/max {options['batch']}" if options["batch"] else ""
    log(f"TensorRT {trt.__version__}: building {engine_path.name} from {onnx_path.name}: {mode}{batch}...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {source.name} (see its log above)")
    data = bytes(serialized)
    write_atomic(engine_path, data)
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    write_atomic(engine_path.with_suffix(".json"), json.dumps(onnx_meta(onnx_path)))  # strides, names
    report = inspect_engine(data, {n: s[1] for n, s in profiles.items()})
    write_report(report, engine_path)
    log(format_summary(report, engine_path.name))
    write_atomic(build_record_path(engine_path), json.dumps({"key": key, "onnx": onnx_path.name, "options": options},
                                                            indent=1))
    return engine_path


def inspect_engine(engine_bytes, opt_shapes=None):
    """The engine report of a serialized engine (IEngineInspector, JSON). With a dynamic input the
    inspector needs an execution context with shapes set, else the formats read 'N/A'."""
    trt = _trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise UserError("TensorRT could not load the engine it just built")
    inspector = engine.create_engine_inspector()
    context = engine.create_execution_context()
    for name, shape in (opt_shapes or {}).items():
        context.set_input_shape(name, tuple(shape))
    inspector.execution_context = context
    return parse_engine_info(inspector.get_engine_information(trt.LayerInformationFormat.JSON), len(engine_bytes))


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, path, engine=None, names=None, strides=None, rebuild=False, **build_kw):
        """path: an ONNX (the engine is built beside it, or reused when its build key matches) or an .engine."""
        trt = _trt()
        path = Path(path)
        if path.suffix == ".engine":
            engine = path
            side = path.with_suffix(".json")
            meta = json.loads(side.read_text()) if side.is_file() else {}
        else:
            meta = onnx_meta(path)
            engine = build_engine(path, engine, rebuild=rebuild, **build_kw)
        super().__init__(path, names, strides, meta)
        self.report = read_report(engine)
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
        self.batch, self.height, self.width = static_dim(dims[0]), static_dim(dims[2]), static_dim(dims[3])
        if self.batch is None:  # dynamic: chunks no larger than the profile's max
            self.max_batch = int(self.engine.get_tensor_profile_shape(self._inputs[0], 0)[2][0])
        self._dtypes = {n: torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                        for n in io}

    def _infer(self, x):
        if self.batch is None and x.shape[0] > self.max_batch:
            return np.concatenate([self._infer(x[i:i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)])
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
