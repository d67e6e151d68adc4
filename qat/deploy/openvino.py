"""OpenVINO, the CPU default.

The Q/DQ ONNX stays TensorRT-shaped (int8 activations, zero point 0); this module compiles a copy in
the INT8 form that is fastest on the processor at hand (DESIGN.md section 5), chosen by
`choose_form`:
- activation form: `int8` (as exported) or `uint8` (every activation Q/DQ pair rewritten to the
  numerically identical zero point 128 form). By rule where measurements back it (AMX -> int8;
  VNNI without AMX, or AVX2 -> uint8), else by compiling both forms and timing a few calls (cached
  per CPU model, ONEDNN_MAX_CPU_ISA and OpenVINO version under ~/.cache/yolov9-qat).
- weight bits: on x86 processors without VNNI / AMX OpenVINO's u8 x s8 kernels saturate with
  full-range int8 weights; there the weights must be 7-bit: a model trained with --weight-bits 7
  already is, any other is re-quantized to 7 bits with a warning (accuracy may drop).
The processor is what oneDNN will use: /proc/cpuinfo capped by ONEDNN_MAX_CPU_ISA (`qat.deploy.cpu`).
`act_form=` and `vnni=` override the choice. Float layers run in f32 (INFERENCE_PRECISION_HINT), so
results do not depend on whether the CPU has bf16.

`export_ir` writes the chosen form as an OpenVINO IR folder (`<stem>_openvino_model/`: .xml, .bin
with int8 weights, and upstream's `<stem>.yaml` metadata); `OpenVINOBackend` runs an ONNX or such a
folder. The graph rewrites are in `qat.deploy.openvino_rewrites` (they exist only for this runtime and
work on a copy), the side-by-side latency measurement in `qat.deploy.latency`. Over 300 lines: the
backend, the per-CPU form choice it needs and the IR export belong together.
"""
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx

from qat.compat import UserError
from qat.deploy.base import Backend, log, onnx_meta, static_dim
from qat.deploy.cpu import cpu_int8_features, effective_isa
from qat.deploy.openvino_rewrites import (activations_to_uint8, quantize_before_slices, requantize_weights,
                                          weight_levels, zero_point_free_convs)
from qat.graph import load_model, metadata, qdq_counts

ACT_FORMS = ("auto", "int8", "uint8", "measure")
IR_SUFFIX = "_openvino_model"

# The rules and the measurements behind them (2 threads, OpenVINO 2026.4; DESIGN.md section 5)
RULES = {
    "amx": ("int8", 8, "AMX: the int8 form runs brgconv_avx512_amx_i8 kernels (Xeon, demo model: convolutions "
                       "10.3 ms int8 form vs 15.4 ms uint8 form; gelan-c 113.5 vs 123 ms)"),
    "vnni": ("uint8", 8, "VNNI without AMX: the uint8 form runs every convolution in INT8, the int8 form leaves "
                         "those after a Concat in f32 (Xeon capped at AVX512_CORE_VNNI: demo 12.2 vs 13.9 ms; "
                         "AMD EPYC gelan-c 360 vs 648 ms)"),
    "avx2": ("uint8", 7, "AVX2 without VNNI: uint8 form (gelan-c 1012 vs 1465 ms int8 form under AVX2) and 7-bit "
                         "weights (u8 x s8 pairs summed in 16 bits saturate with 8-bit weights)"),
}


@dataclass
class FormChoice:
    """The INT8 form OpenVINO runs: activation form, weight bits, and why."""
    act_form: str  # 'int8' (zero point 0, as exported) | 'uint8' (zero point 128)
    weight_bits: int  # 8, or 7 where the kernels saturate
    reason: str
    isa: dict = field(default_factory=dict)
    timings_ms: dict = None  # {form: ms} when measured

    def describe(self):
        cpu = self.isa.get("isa") or "unknown ISA"
        cap = f", ONEDNN_MAX_CPU_ISA={self.isa['cap']}" if self.isa.get("cap") else ""
        return (f"{self.act_form} activations ({'zero point 128' if self.act_form == 'uint8' else 'zero point 0'}), "
                f"{self.weight_bits}-bit weights [{cpu}{cap}]: {self.reason}")

    def to_dict(self):
        return asdict(self)


def _weight_bits(isa, vnni):
    """(bits, why) from the --vnni override or the effective ISA."""
    if vnni is not None:
        return (8, "override: VNNI") if vnni else (7, "override: no VNNI")
    if isa["isa"] in ("amx", "vnni"):
        return 8, "VNNI/AMX"
    if isa["isa"] in ("avx2", "older"):
        return 7, "no VNNI/AMX"
    return 8, f"VNNI unknown ({isa['source']}): weights kept"


def choose_form(act_form="auto", vnni=None, onnx_model=None, threads=None, input_shape=None, cache_dir=None,
                isa=None):
    """The FormChoice for this processor. act_form: auto (rule, else measured) | int8 | uint8 |
    measure (time both now, whatever the rule and the cache say); vnni: None = detect, True/False = override the weight
    bits. Measuring needs `onnx_model` (the Q/DQ ONNX)."""
    if act_form not in ACT_FORMS:
        raise UserError(f"--act-form {act_form} is unknown: use one of {', '.join(ACT_FORMS)}")
    isa = isa or effective_isa()
    bits, bits_why = _weight_bits(isa, vnni)
    if act_form in ("int8", "uint8"):
        return FormChoice(act_form, bits, f"override (--act-form {act_form}); weights: {bits_why}", isa)
    if act_form == "auto" and isa["isa"] in RULES:
        form, rule_bits, why = RULES[isa["isa"]]
        if vnni is not None:
            why += f"; weights: {bits_why}"
        return FormChoice(form, bits if vnni is not None else rule_bits, why, isa)
    if onnx_model is None:
        raise UserError("no rule for this processor and no model to time the two activation forms on: "
                        "pass --act-form int8 or uint8")
    form, timings, cached = measured_form(onnx_model, threads, input_shape, cache_dir, isa,
                                          refresh=act_form == "measure")
    why = (f"{'cached measurement' if cached else 'measured'} ({', '.join(f'{k} {v:.1f} ms' for k, v in timings.items())})"
           f"{'' if act_form == 'measure' else ': no rule for ' + str(isa['isa'] or isa['source'])}; "
           f"weights: {bits_why}")
    return FormChoice(form, bits, why, isa, timings)


def cache_file(cache_dir=None):
    root = cache_dir or os.environ.get("YOLOV9_QAT_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yolov9-qat"
    return Path(root) / "openvino-act-form.json"


def _cache_key(isa):
    import openvino as ov

    return f"{isa.get('model') or isa.get('source')} | ONEDNN_MAX_CPU_ISA={isa.get('cap') or '-'} | OpenVINO {ov.__version__}"


def measured_form(onnx_model, threads=None, input_shape=None, cache_dir=None, isa=None, calls=3, refresh=False):
    """(fastest form, {form: median ms}, from_cache): both forms compiled and timed in turns, the
    answer cached per CPU model, ONEDNN_MAX_CPU_ISA and OpenVINO version (refresh: measure again)."""
    import openvino as ov

    isa = isa or effective_isa()
    path, key = cache_file(cache_dir), _cache_key(isa)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("act_form") in ("int8", "uint8"):
        return cache[key]["act_form"], cache[key].get("ms", {}), True
    core = ov.Core()
    requests, x = {}, None
    for form in ("int8", "uint8"):
        m = onnx.ModelProto()
        m.CopyFrom(onnx_model)
        prepare_onnx(m, FormChoice(form, 8, "timed", isa))  # each form as it would be deployed
        ov_model = _read_onnx(core, m)
        shape = list(input_shape) if input_shape else _static_or(ov_model, [1, 3, 320, 320])
        ov_model.reshape({ov_model.inputs[0].get_any_name(): shape})
        requests[form] = core.compile_model(ov_model, "CPU", compile_config("f32", threads)).create_infer_request()
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
    times = {f: [] for f in requests}
    for r in requests.values():
        r.infer({0: x})
    for _ in range(calls):
        for f, r in requests.items():
            t0 = time.perf_counter()
            r.infer({0: x})
            times[f].append(time.perf_counter() - t0)
    ms = {f: statistics.median(t) * 1e3 for f, t in times.items()}
    form = min(ms, key=ms.get)
    cache[key] = {"act_form": form, "ms": ms, "date": datetime.now().isoformat(timespec="seconds")}
    try:  # a cache that cannot be written only costs a re-measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log(f"OpenVINO: could not write the activation-form cache {path}: {e}")
    return form, ms, False


def _static_or(ov_model, default):
    shape = ov_model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape]
    return [d if d else default[i] for i, d in enumerate(dims)] if len(dims) == 4 else default


def compile_config(precision="f32", threads=None, hint="LATENCY", profile=False):
    """The CPU plugin config: precision None = the runtime's default (bf16 on CPUs that have it)."""
    config = {"PERFORMANCE_HINT": hint}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if profile:
        config["PERF_COUNT"] = True
    return config


def _read_onnx(core, onnx_model):
    with tempfile.TemporaryDirectory() as tmp:  # OpenVINO reads ONNX from a file
        f = Path(tmp) / "model.onnx"
        onnx.save(onnx_model, str(f))
        return core.read_model(str(f))


def prepare_onnx(onnx_model, choice, stacklevel=3, zero_point_free=True):
    """Apply `choice` to the Q/DQ ONNX in place: one Q/DQ before each split tensor instead of one per
    part (`quantize_before_slices`), the activation form, the weight bits (re-quantizing 8-bit weights
    to 7 with a warning where needed), and in the uint8 form convolutions fed with zero point 0
    (`zero_point_free_convs`; zero_point_free=False leaves them at 128, to measure the difference).
    Returns {'uint8_rewritten', 'weights_requantized', 'weight_max_q', 'slices_hoisted',
    'zero_point_free_convs'}."""
    info = {"uint8_rewritten": 0, "weights_requantized": [],
            "weight_max_q": max(weight_levels(onnx_model).values(), default=0),
            "slices_hoisted": quantize_before_slices(onnx_model), "zero_point_free_convs": 0}
    if choice.act_form == "uint8":
        info["uint8_rewritten"] = activations_to_uint8(onnx_model)
    if choice.weight_bits == 7 and info["weight_max_q"] > 64:
        info["weights_requantized"] = requantize_weights(onnx_model, 7)
        warnings.warn(f"no VNNI/AMX ({choice.isa.get('source', '?')}; {choice.reason}): OpenVINO's int8 kernels "
                      f"would saturate with 8-bit weights, so {len(info['weights_requantized'])} weight tensors were "
                      f"re-quantized to 7 bits; accuracy may drop. Train with --weight-bits 7 for these CPUs, or "
                      f"pass vnni=True (--vnni yes) to keep 8-bit weights", stacklevel=stacklevel)
    if choice.act_form == "uint8" and zero_point_free:  # after the weights: the bias takes their final values
        info["zero_point_free_convs"] = zero_point_free_convs(onnx_model)
    return info


def ir_xml(path):
    """The .xml of an OpenVINO IR (a folder holding one, or the .xml itself); None for other files."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise UserError(f"'{path}' should hold one OpenVINO IR .xml (export_qat.py --include openvino writes "
                            f"one), found {len(xmls)}")
        return xmls[0]
    return path if path.suffix.lower() == ".xml" else None


def ir_metadata(xml):
    """The IR's metadata: upstream's `<stem>.yaml` beside the .xml (stride, names) plus ours."""
    import yaml

    f = Path(xml).with_suffix(".yaml")
    try:
        return yaml.safe_load(f.read_text()) or {} if f.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{f} is not readable YAML ({str(e).splitlines()[0]}): export the model again") from None


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, path, threads=None, act_form="auto", vnni=None, device="CPU", precision="f32", names=None,
                 strides=None, model=None, input_shape=None, hint="LATENCY", cache_dir=None):
        """path: a Q/DQ (or FP32) ONNX, or an OpenVINO IR folder / .xml from export_ir; model: an
        onnx.ModelProto to use instead of reading `path`; act_form / vnni: see choose_form;
        input_shape: (B, 3, H, W) to fix a dynamic-shape file to (OpenVINO then folds the shape math)."""
        try:
            import openvino as ov
        except ImportError:
            raise UserError("backend 'openvino' needs the openvino package: pip install openvino") from None
        core = ov.Core()
        xml = ir_xml(path) if model is None else None
        self.cpu = cpu_int8_features()
        self.uint8_rewritten, self.weights_requantized, self.zero_point_free_convs = 0, [], 0
        if xml is not None:
            meta = ir_metadata(xml)
            super().__init__(path, names, strides, meta)
            self.ov_model = core.read_model(str(xml))
            self.quantized = any(op.get_type_name() == "FakeQuantize" for op in self.ov_model.get_ops())
            self.weight_max_q = int(meta.get("weight_max_q", 0))
            self.choice = self._ir_choice(meta, act_form, vnni, threads)
        else:
            meta = onnx_meta(path) if model is None else metadata(model)
            super().__init__(path, names, strides, meta)
            onnx_model = load_model(model if model is not None else path)
            counts = qdq_counts(onnx_model)
            self.quantized = counts["QuantizeLinear"] + counts["DequantizeLinear"] > 0
            self.choice = None
            self.weight_max_q = 0
            if self.quantized:
                self.choice = choose_form(act_form, vnni, onnx_model, threads, input_shape, cache_dir)
                log(f"OpenVINO INT8 form: {self.choice.describe()}")
                info = prepare_onnx(onnx_model, self.choice, stacklevel=3)
                self.uint8_rewritten, self.weights_requantized = info["uint8_rewritten"], info["weights_requantized"]
                self.zero_point_free_convs = info["zero_point_free_convs"]
                self.weight_max_q = info["weight_max_q"]
            self.ov_model = _read_onnx(core, onnx_model)
        self.vnni = self.cpu["vnni"] if vnni is None else bool(vnni)
        self.act_form = self.choice.act_form if self.choice else None
        if input_shape is not None:
            self.ov_model.reshape({self.ov_model.inputs[0].get_any_name(): list(input_shape)})
        self.threads, self.precision = threads, precision
        try:
            self.compiled = core.compile_model(self.ov_model, device, compile_config(precision, threads, hint))
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

    def _ir_choice(self, meta, act_form, vnni, threads):
        """The form an IR was exported in (it cannot be rewritten here); says when this processor
        would want another one, and warns when its 8-bit weights would saturate here."""
        if not self.quantized:
            return None
        isa = effective_isa()
        form, bits = str(meta.get("act_form", "?")), int(meta.get("weight_bits", 8))
        made_for = meta.get("chosen_for", "another machine")
        choice = FormChoice(form, bits, f"as exported for {made_for}", isa)
        log(f"OpenVINO INT8 form: {choice.describe()}")
        if act_form in ("int8", "uint8") and act_form != form:
            raise UserError(f"{self.path} holds the {form} activation form; --act-form {act_form} needs the Q/DQ ONNX "
                            f"(or export_qat.py --include openvino --act-form {act_form})")
        rule = RULES.get(isa["isa"])
        if rule and rule[0] != form:
            log(f"OpenVINO: this processor ({isa['isa']}) runs the {rule[0]} form faster: export again here "
                f"(export_qat.py --include openvino) for the best speed")
        bits_here, _ = _weight_bits(isa, vnni)
        if bits == 8 and bits_here == 7 and self.weight_max_q > 64:
            warnings.warn(f"{self.path.name} has 8-bit weights but this processor has no VNNI/AMX ({isa['source']}): "
                          f"OpenVINO's int8 kernels saturate and accuracy may drop; export again on this machine "
                          f"(or with --vnni no) for 7-bit weights", stacklevel=3)
        return choice

    def _infer(self, x):
        self._request.infer({0: x})
        return self._request.get_tensor(self._out).data.copy()

    def conv_precisions(self):
        """{'int8': n, 'float': n, 'total': n} of the convolutions in the compiled (runtime) model."""
        return conv_precisions(self.compiled)

    def save_ir(self, xml_path):
        """Write the deployed model as OpenVINO IR (.xml + .bin, weights stored as int8); returns the
        .bin size in MB."""
        import openvino as ov

        xml_path = Path(xml_path)
        xml_path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(compressed_ir(self.ov_model), str(xml_path), compress_to_fp16=False)
        return xml_path.with_suffix(".bin").stat().st_size / (1 << 20)

    def describe(self):
        if not self.quantized:
            return f"openvino {self.precision} ({self.path.name})"
        bits = "re-quantized to 7 bits" if self.weights_requantized else \
            f"{self.choice.weight_bits}-bit" + (f" (up to ±{self.weight_max_q})" if self.weight_max_q else "")
        vnni = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[self.vnni]
        return f"openvino {self.precision}, {self.act_form} activations, weights {bits}, {vnni} ({self.path.name})"


def conv_precisions(compiled):
    """{'int8': n, 'float': n, 'total': n} of the convolutions in a compiled model's runtime model:
    rt_info runtimePrecision u8/i8 = INT8 kernel."""
    int8 = flt = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "onvolution" not in str(info["layerType"].astype(str)):
            continue
        prec = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else ""
        if prec in ("u8", "i8"):
            int8 += 1
        else:
            flt += 1
    return {"int8": int8, "float": flt, "total": int8 + flt}


def read_onnx(onnx_model_or_path):
    """An ov.Model from an ONNX path or ModelProto."""
    import openvino as ov

    core = ov.Core()
    if isinstance(onnx_model_or_path, onnx.ModelProto):
        return _read_onnx(core, onnx_model_or_path)
    return core.read_model(str(onnx_model_or_path))


def compressed_ir(ov_model):
    """A copy whose quantized float weights are stored as int8 constants (what OpenVINO's model
    converter does for FakeQuantize weights): same outputs, a quarter of the size."""
    from openvino._offline_transformations import compress_quantize_weights_transformation

    m = ov_model.clone()
    compress_quantize_weights_transformation(m)
    return m


def export_ir(onnx_path, out_dir=None, act_form="auto", vnni=None, threads=None, cache_dir=None):
    """Write `<stem>_openvino_model/` beside the ONNX (or `out_dir`): `<stem>.xml`/`.bin` (the
    chosen INT8 form, int8 weights) and `<stem>.yaml` (upstream's stride + names, and imgsz, strides,
    act_form, weight_bits, chosen_for, ...). Built in a temporary folder, then renamed into place, so a
    failed export leaves the old folder intact. Returns {'path', 'choice', 'convs', 'size_mb'}."""
    import openvino as ov
    import yaml

    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir else onnx_path.with_name(onnx_path.stem + IR_SUFFIX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = OpenVINOBackend(onnx_path, threads=threads, act_form=act_form, vnni=vnni, cache_dir=cache_dir)
    for w in caught:
        log(f"WARNING: {w.message}")
    meta = {k: v for k, v in backend.meta.items() if k != "graph_report"}
    names = backend.names or meta.get("names") or []
    meta.update(stride=int(max(backend.stride)), names=dict(enumerate(names)) if isinstance(names, list) else names,
                strides=[int(s) for s in backend.stride.tolist()], openvino=ov.__version__,
                exported=datetime.now().isoformat(timespec="seconds"))
    if backend.choice is not None:
        isa = backend.choice.isa
        meta.update(act_form=backend.choice.act_form, weight_bits=backend.choice.weight_bits,
                    weight_max_q=64 if backend.weights_requantized else backend.weight_max_q,
                    form_reason=backend.choice.reason,
                    chosen_for=f"{isa.get('model') or '?'} ({isa.get('isa')}"
                               f"{', ONEDNN_MAX_CPU_ISA=' + isa['cap'] if isa.get('cap') else ''})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        xml = tmp / f"{onnx_path.stem}.xml"
        size = backend.save_ir(xml)
        xml.with_suffix(".yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out_dir, "choice": backend.choice, "convs": backend.conv_precisions(), "size_mb": size}


def _replace_dir(tmp, final):
    """Rename the finished folder `tmp` to `final`; an existing `final` is moved aside first and
    removed after (a directory cannot be os.replace'd onto a non-empty one)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
