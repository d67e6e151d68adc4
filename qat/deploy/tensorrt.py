"""TensorRT: an engine built with the TensorRT Python API from the Q/DQ ONNX (explicit quantization:
scales come from the Q/DQ nodes, no calibrator), FP16 allowed for float layers, an optimization profile
for a dynamic batch, a timing cache, the engine saved beside the ONNX. Needs the `tensorrt` package and
an NVIDIA GPU; without them it stops with a one-line message.
"""
import json
from pathlib import Path

import numpy as np
import torch

from qat.compat import UserError
from qat.deploy.base import Backend, log, onnx_meta, static_dim


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
    meta = onnx_meta(onnx_path)
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
        path = Path(path)
        if path.suffix == ".engine":
            engine = path
            side = path.with_suffix(".json")
            meta = json.loads(side.read_text()) if side.is_file() else {}
        else:
            meta = onnx_meta(path)
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
        self.batch, self.height, self.width = static_dim(dims[0]), static_dim(dims[2]), static_dim(dims[3])
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

