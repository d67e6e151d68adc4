"""Ready deployment files for an exported ONNX, written beside it (no TensorRT or GPU needed):

    <stem>.trtexec.sh                 trtexec command lines for TensorRT 10 (INT8/FP16 flags) and 11
                                      (strongly typed: ModelOpt AutoCast first), right min/opt/max shapes
    <stem>.deepstream/                config_infer_primary.txt (nvinfer, network-mode INT8, no
                                      int8-calib-file) and labels.txt
    <stem>.triton/<stem>/             config.pbtxt + 1/model.plan (the engine when one was built here)
                                      or 1/model.onnx (ONNX Runtime backend)

Names and shapes come from the ONNX itself (`onnx_io`) and its metadata (imgsz, strides, names,
end2end), so a static and a dynamic export each get files that match them.
`DEPLOY_WRITERS` maps the `export_qat.py --include` names to the writers.

Over 300 lines: three file formats (trtexec, DeepStream, Triton), each a short writer over the
same ONNX input/output reading.
"""
import shutil
from pathlib import Path

from qat.compat import UserError, atomic_output

MAX_BATCH = 32  # dynamic exports: the optimization profile's max (and Triton's max_batch_size)
OPT_BATCH = 8
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 3: "TYPE_INT8",
                  2: "TYPE_UINT8", 9: "TYPE_BOOL"}
TRT_NMS_OUTPUTS = ["num_dets", "det_boxes", "det_scores", "det_classes"]


def write_atomic(path, data):
    """Write bytes or text to `path` through the one atomic writer (qat.compat.atomic_output)."""
    data = data.encode() if isinstance(data, str) else bytes(data)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def onnx_io(onnx_path):
    """{'inputs': [...], 'outputs': [...]} with name, dims (int, or the symbolic name for a dynamic
    axis) and ONNX elem_type; plus 'meta' (the file's metadata)."""
    import onnx

    from qat.deploy.base import onnx_meta

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "dims": dims, "elem_type": t.elem_type}

    return {"inputs": [spec(v) for v in model.graph.input if v.name not in inits],
            "outputs": [spec(v) for v in model.graph.output], "meta": onnx_meta(onnx_path)}


def _is_dynamic(d):
    return not isinstance(d, int) or d <= 0


def _anchors(h, w, strides):
    return sum((h // s) * (w // s) for s in strides)


def resolved_shapes(io, batch=None):
    """Concrete shapes of every input and output for a batch (None: keep the batch axis as is):
    dynamic height/width become the exported imgsz, the head's anchors axis the anchor count."""
    meta = io["meta"]
    h, w = (meta.get("imgsz") or [None, None])[:2]
    strides = [int(s) for s in (meta.get("strides") or [8, 16, 32])]
    out = {}
    for t in io["inputs"]:
        dims = list(t["dims"])
        if len(dims) == 4:
            for i, v in ((2, h), (3, w)):
                if _is_dynamic(dims[i]):
                    if v is None:
                        raise UserError(f"input {t['name']} has a dynamic size and the file records no imgsz; "
                                        f"export with export_qat.py")
                    dims[i] = int(v)
            if batch is not None:
                dims[0] = int(batch)
        out[t["name"]] = dims
    for t in io["outputs"]:
        dims = list(t["dims"])
        if t["name"] == "output0" and len(dims) == 3:  # (B, 4+nc, anchors): the tracer may leave both symbolic
            if _is_dynamic(dims[1]) and meta.get("names"):
                dims[1] = 4 + len(meta["names"])
            if _is_dynamic(dims[2]) and h:
                dims[2] = _anchors(int(h), int(w), strides)
        if meta.get("end2end") == "tensorrt" and t["name"] in TRT_NMS_OUTPUTS:
            # EfficientNMS_TRT's documented outputs; the tracer cannot infer a plugin's shapes
            k = int(meta.get("max_det") or 100)
            b0 = io["inputs"][0]["dims"][0]
            dims = [b0] + {"num_dets": [1], "det_boxes": [k, 4]}.get(t["name"], [k])
        if batch is not None and dims and t["name"] != "detections":
            dims[0] = int(batch)
        out[t["name"]] = dims
    return out


def _batch_range(io, max_batch, opt_batch):
    """(min, opt, max) batch, or None for a static batch."""
    b = io["inputs"][0]["dims"][0]
    if not _is_dynamic(b):
        return None
    mx = int(max_batch or MAX_BATCH)
    return 1, int(min(opt_batch or OPT_BATCH, mx)), mx


def _shape_flags(io, max_batch, opt_batch):
    rng = _batch_range(io, max_batch, opt_batch)
    dyn_hw = any(_is_dynamic(d) for d in io["inputs"][0]["dims"][1:])
    if rng is None and not dyn_hw:
        return ""
    rng = rng or (io["inputs"][0]["dims"][0],) * 3
    flags = []
    for key, b in zip(("minShapes", "optShapes", "maxShapes"), rng):
        parts = [f"{n}:{'x'.join(str(d) for d in dims)}" for n, dims in resolved_shapes(io, b).items()
                 if n in {t["name"] for t in io["inputs"]}]
        flags.append(f"--{key}={','.join(parts)}")
    return " ".join(flags)


def has_qdq(onnx_path):
    from qat.graph import qdq_counts

    c = qdq_counts(onnx_path)
    return c["QuantizeLinear"] + c["DequantizeLinear"] > 0


def trtexec_script(onnx_path, max_batch=None, opt_batch=None):
    """The text of `<stem>.trtexec.sh`: one build for TensorRT 10 (weak typing: --int8 for a Q/DQ
    file, --fp16 for the float layers) and one for TensorRT 11 (strongly typed: the float layers
    made FP16 in the ONNX by ModelOpt AutoCast, Q/DQ and their scales kept FP32, no precision flags).
    Both save the per-layer information (--exportLayerInfo) that the engine report reads."""
    onnx_path = Path(onnx_path)
    io = onnx_io(onnx_path)
    stem, qdq = onnx_path.stem, has_qdq(onnx_path)
    shapes = _shape_flags(io, max_batch, opt_batch)
    shapes = f" \\\n    {shapes}" if shapes else ""
    common = "--profilingVerbosity=detailed --skipInference"
    flags10 = "--int8 --fp16" if qdq else "--fp16"
    exclude = " --op_types_to_exclude QuantizeLinear DequantizeLinear" if qdq else ""
    kind = "INT8 (Q/DQ) + FP16 float layers" if qdq else "FP16 baseline (FP32 ONNX)"
    e2e = io["meta"].get("end2end") == "tensorrt"
    return f"""#!/usr/bin/env bash
# TensorRT engine for {onnx_path.name}: {kind}.
# Input {', '.join(f"{t['name']} {t['dims']}" for t in io['inputs'])}; \
outputs {', '.join(f"{t['name']} {t['dims']}" for t in io['outputs'])}.
# Written by export_qat.py --include trtexec; run in this folder with `bash {stem}.trtexec.sh [10|11]`
# (default: the installed TensorRT's major version).{'''
# --end2end --nms tensorrt: the EfficientNMS_TRT plugin comes from libnvinfer_plugin, which trtexec loads.''' if e2e else ''}
set -euo pipefail
cd "$(dirname "$0")"
TRT_MAJOR="${{1:-$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])' 2>/dev/null || echo 10)}}"
if [ "$TRT_MAJOR" -ge 11 ]; then
  # TensorRT 11: strongly typed only (no precision flags); the ONNX says which layers are FP16
  python3 -m modelopt.onnx.autocast --onnx_path={onnx_path.name} --output_path={stem}.fp16.onnx \\
    --low_precision_type=fp16 --keep_io_types{exclude}
  trtexec --onnx={stem}.fp16.onnx --saveEngine={stem}.engine{shapes} \\
    {common} --exportLayerInfo={stem}.layers.json --timingCacheFile={stem}.timing.cache
else
  # TensorRT 10 (Jetson / JetPack): weak typing with precision flags; Q/DQ give the INT8 layers
  trtexec --onnx={onnx_path.name} --saveEngine={stem}.engine {flags10}{shapes} \\
    {common} --exportLayerInfo={stem}.layers.json --timingCacheFile={stem}.timing.cache
fi
# per-layer precisions and reformat count: python -m qat.deploy.engine_report {stem}.layers.json --engine {stem}.engine
"""


def write_trtexec(onnx_path, max_batch=None, opt_batch=None, **_):
    onnx_path = Path(onnx_path)
    path = write_atomic(onnx_path.with_name(onnx_path.stem + ".trtexec.sh"),
                        trtexec_script(onnx_path, max_batch, opt_batch))
    path.chmod(0o755)
    return path


def _names(meta, nc):
    names = meta.get("names") or {}
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=lambda k: int(k))]
    names = [str(n) for n in names]
    return names + [str(i) for i in range(len(names), nc)]


def _nc(io):
    shapes = resolved_shapes(io)
    if "output0" in shapes:
        return int(shapes["output0"][1]) - 4
    return len(io["meta"].get("names") or {})


def deepstream_config(onnx_path, engine_path=None, batch=None, parser_lib=None):
    """The text of config_infer_primary.txt for nvinfer: network-mode=1 (INT8 from the Q/DQ nodes,
    so no int8-calib-file), RGB 0-1 input (net-scale-factor 1/255), centred letterbox like val.py's (maintain-aspect-ratio,
    symmetric-padding)."""
    onnx_path = Path(onnx_path)
    io = onnx_io(onnx_path)
    meta, nc = io["meta"], _nc(io)
    e2e = meta.get("end2end") or ""
    if e2e == "onnx":
        raise UserError(f"{onnx_path.name} has ONNX NonMaxSuppression inside (--nms onnx): DeepStream needs the "
                        f"plain export or --end2end --nms tensorrt")
    inp = io["inputs"][0]
    c, h, w = resolved_shapes(io)[inp["name"]][1:]
    rng = _batch_range(io, None, None)
    batch = int(batch or (rng[1] if rng else inp["dims"][0]))
    if rng is None and batch != inp["dims"][0]:
        raise UserError(f"{onnx_path.name} has a static batch of {inp['dims'][0]}: use batch-size {inp['dims'][0]} "
                        f"or export with --dynamic")
    qdq = has_qdq(onnx_path)
    engine = Path(engine_path).name if engine_path else f"{onnx_path.stem}.engine"
    outputs = [t["name"] for t in io["outputs"]]
    if e2e == "tensorrt":
        layout = ("# Output layout (--end2end --nms tensorrt, EfficientNMS_TRT): num_dets (B,1) int32, det_boxes "
                  "(B,K,4) x1y1x2y2 pixels,\n# det_scores (B,K), det_classes (B,K) int32. NMS is inside the engine "
                  "(cluster-mode=4: none).\n# Parser: NvDsInferParseCustomEfficientNMS (NVIDIA-AI-IOT/yolo_deepstream "
                  "or DeepStream's sample parsers).")
        func, cluster = "NvDsInferParseCustomEfficientNMS", 4
    else:
        layout = (f"# Output layout (plain export): output0 (B, 4+nc={4 + nc}, anchors={resolved_shapes(io)['output0'][2]})"
                  f" float: rows 0-3 box cx,cy,w,h in input\n# pixels, rows 4.. class scores after sigmoid (no "
                  f"objectness). NMS by nvinfer (cluster-mode=2). Parser: a custom\n# NvDsInferParseCustom function "
                  f"for this (B, 4+nc, anchors) layout (e.g. the YOLOv8/v9 parsers of DeepStream-Yolo).")
        func, cluster = "NvDsInferParseYolo", 2
    lib = parser_lib or "nvdsinfer_custom_impl_Yolo/libnvdsinfer_custom_impl_Yolo.so"
    precision = "1" if qdq else "2"
    return f"""# DeepStream nvinfer config for {onnx_path.name} (written by export_qat.py --include deepstream)
{layout}
# network-mode={precision} ({'INT8: the scales come from the Q/DQ nodes, so there is no int8-calib-file' if qdq
                            else 'FP16: a float export'}).
# On TensorRT 11 (strongly typed), convert the ONNX with ModelOpt AutoCast first (see {onnx_path.stem}.trtexec.sh)
# and set onnx-file to the .fp16.onnx, or point model-engine-file at an engine built by that script.
[property]
gpu-id=0
net-scale-factor=0.0039215697906911373
model-color-format=0
onnx-file=../{onnx_path.name}
model-engine-file=../{engine}
labelfile-path=labels.txt
batch-size={batch}
network-mode={precision}
num-detected-classes={nc}
infer-dims={c};{h};{w}
output-blob-names={';'.join(outputs)}
network-type=0
process-mode=1
gie-unique-id=1
interval=0
cluster-mode={cluster}
maintain-aspect-ratio=1
symmetric-padding=1
parse-bbox-func-name={func}
custom-lib-path={lib}

[class-attrs-all]
nms-iou-threshold={meta.get('iou_thres', 0.45)}
pre-cluster-threshold={meta.get('conf_thres', 0.25)}
topk={meta.get('max_det', 300)}
"""


def write_deepstream(onnx_path, engine_path=None, batch=None, parser_lib=None, **_):
    onnx_path = Path(onnx_path)
    folder = onnx_path.with_name(onnx_path.stem + ".deepstream")
    io = onnx_io(onnx_path)
    cfg = write_atomic(folder / "config_infer_primary.txt", deepstream_config(onnx_path, engine_path, batch, parser_lib))
    write_atomic(folder / "labels.txt", "\n".join(_names(io["meta"], _nc(io))) + "\n")
    return cfg


def _dims_text(dims):
    return "[ " + ", ".join(str(d if isinstance(d, int) and d > 0 else -1) for d in dims) + " ]"


def triton_config(onnx_path, name=None, engine=False, max_batch=None):
    """The text of config.pbtxt: platform tensorrt_plan (engine=True) or the onnxruntime backend;
    a dynamic batch -> max_batch_size and dims without the batch axis, plus dynamic_batching; a
    static one -> max_batch_size 0 and full dims."""
    onnx_path = Path(onnx_path)
    io = onnx_io(onnx_path)
    name = name or onnx_path.stem
    rng = _batch_range(io, max_batch, None)
    shapes = resolved_shapes(io)
    batched = rng is not None and io["meta"].get("end2end") != "onnx"  # (K, 7) detections have no batch axis
    lines = [f'name: "{name}"', 'platform: "tensorrt_plan"' if engine else 'backend: "onnxruntime"',
             f"max_batch_size: {rng[2] if batched else 0}"]
    for key, tensors in (("input", io["inputs"]), ("output", io["outputs"])):
        lines.append(f"{key} [")
        for i, t in enumerate(tensors):
            dims = shapes[t["name"]][1:] if batched else shapes[t["name"]]
            dtype = ONNX_TO_TRITON.get(t["elem_type"])
            if dtype is None:
                raise UserError(f"tensor {t['name']} has ONNX type {t['elem_type']}, which this writer does not map")
            lines += ["  {", f'    name: "{t["name"]}"', f"    data_type: {dtype}", f"    dims: {_dims_text(dims)}",
                      "  }" + ("," if i < len(tensors) - 1 else "")]
        lines.append("]")
    if batched:
        preferred = sorted({b for b in (rng[1], rng[2] // 2, rng[2]) if b >= 1})
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
                  "  max_queue_delay_microseconds: 100", "}"]
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {'KIND_GPU' if engine else 'KIND_AUTO'}", "  }",
              "]"]
    return "\n".join(lines) + "\n"


def write_triton(onnx_path, engine_path=None, max_batch=None, **_):
    """<stem>.triton/<stem>/config.pbtxt and 1/model.plan (engine_path given and present) or 1/model.onnx."""
    onnx_path = Path(onnx_path)
    repo = onnx_path.with_name(onnx_path.stem + ".triton")
    model_dir = repo / onnx_path.stem
    engine = Path(engine_path) if engine_path and Path(engine_path).is_file() else None
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    for stale in ("model.plan", "model.onnx"):
        (version / stale).unlink(missing_ok=True)
    shutil.copy2(engine or onnx_path, version / ("model.plan" if engine else "model.onnx"))
    return write_atomic(model_dir / "config.pbtxt", triton_config(onnx_path, onnx_path.stem, engine is not None,
                                                                  max_batch))


def write_engine(onnx_path, max_batch=None, opt_batch=None, **_):
    """The TensorRT engine (+ report) when TensorRT and a GPU are here; else a one-line reason (str)."""
    from qat.deploy.tensorrt import build_engine, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return f"skipped: {why}"
    return build_engine(onnx_path, max_batch=max_batch, opt_batch=opt_batch)


# export_qat.py --include NAME -> writer(onnx_path, engine_path=None, max_batch=None, opt_batch=None, batch=None)
DEPLOY_WRITERS = {"engine": write_engine, "trtexec": write_trtexec, "deepstream": write_deepstream,
                  "triton": write_triton}


def write_deploy_files(onnx_path, include, max_batch=None, opt_batch=None):
    """Run the writers named in `include` (engine first, so Triton can pack it); {name: path or skip reason}."""
    unknown = [n for n in include if n not in DEPLOY_WRITERS]
    if unknown:
        raise UserError(f"--include {' '.join(unknown)}: unknown; use {', '.join(DEPLOY_WRITERS)}")
    out, engine = {}, None
    for name in sorted(include, key=lambda n: n != "engine"):
        r = DEPLOY_WRITERS[name](onnx_path, engine_path=engine, max_batch=max_batch, opt_batch=opt_batch)
        if name == "engine" and not isinstance(r, str):
            engine = r
        out[name] = r
    return out

