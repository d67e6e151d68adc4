"""What a built TensorRT engine really runs: per-layer precision, reformat layers, INT8 vs FP16/FP32
counts, engine size. Parsed from IEngineInspector's JSON (`get_engine_information(JSON)`, engine
built with ProfilingVerbosity.DETAILED), so it needs no GPU or TensorRT once the JSON exists.

    report = parse_engine_info(json_text, engine_bytes=size)
    print(format_summary(report)); write_report(report, "qat_best.engine")  # .report.json / .report.md

The two documented layouts:
- TensorRT 10: `{"Layers": [...], "Bindings": ["images", "output0"]}`; each layer tensor has
  `"Format/Datatype"`, a sentence such as "Row major linear FP32", "Channel major FP16 format where
  channel % 8 == 0" or "Thirty-two wide channel vectorized row major Int8 format".
- TensorRT 11 (migration guide "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"):
  `Bindings` is replaced by `"I/O Tensors"` (objects with Name, IOMode, DataType, Dimensions, ...)
  and the combined field is split into `"DataType"` ("Int8", "Half", "Float", ...) and `"Format"`.
A layer's precision is that of its math: INT8 when an input (or its weights) is Int8, else FP16 when
one is half, else FP32. Reformat layers (LayerType "Reformat", "Reformatting CopyNode ...") are
counted on their own: each is a copy TensorRT had to add between two layers (scale or format
mismatch), and the first thing to look at when INT8 is not faster than FP16.
"""
import json
from collections import Counter
from pathlib import Path

from qat.compat import UserError

PRECISIONS = ("INT8", "FP8", "FP16", "BF16", "FP32", "INT32", "INT64", "BOOL")
# search order matters: "bfloat16" before "float", "half" before "float"
_KEYWORDS = (("int8", "INT8"), ("fp8", "FP8"), ("e4m3", "FP8"), ("bf16", "BF16"), ("bfloat16", "BF16"),
             ("fp16", "FP16"), ("half", "FP16"), ("float16", "FP16"), ("int32", "INT32"), ("int64", "INT64"),
             ("bool", "BOOL"), ("fp32", "FP32"), ("float", "FP32"))
_MATH_ORDER = ("INT8", "FP8", "FP16", "BF16", "FP32")  # the narrowest input decides the layer's math


def tensor_precision(tensor):
    """'INT8' | 'FP16' | ... | 'unknown' for one layer input/output of either layout."""
    text = tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format") or ""
    text = str(text).lower()
    for key, name in _KEYWORDS:
        if key in text:
            return name
    return "unknown"


def is_reformat(layer):
    return layer.get("LayerType") == "Reformat" or str(layer.get("Name", "")).startswith("Reformatting CopyNode")


def layer_precision(layer):
    """The precision of a layer's math: the narrowest float/int8 type among its inputs and weights,
    else that of its outputs (a layer without inputs, e.g. a constant)."""
    ins = [tensor_precision(t) for t in layer.get("Inputs", []) if isinstance(t, dict)]
    weights = layer.get("Weights")
    if isinstance(weights, dict) and weights.get("Type"):
        ins.append(tensor_precision({"DataType": weights["Type"]}))
    outs = [tensor_precision(t) for t in layer.get("Outputs", []) if isinstance(t, dict)]
    for group in (ins, outs):
        for p in _MATH_ORDER:
            if p in group:
                return p
        known = [p for p in group if p != "unknown"]
        if known:
            return known[0]
    return "unknown"


def parse_engine_info(info, engine_bytes=None):
    """The report (a dict) from IEngineInspector JSON text (or the decoded dict) of TensorRT 10 or 11."""
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if not isinstance(data, dict) or "Layers" not in data:
        raise UserError("engine information has no 'Layers': not IEngineInspector JSON output")
    layers = data["Layers"]
    if layers and not isinstance(layers[0], dict):
        raise UserError("the engine information lists layer names only: build the engine with "
                        "ProfilingVerbosity.DETAILED (trtexec --profilingVerbosity=detailed)")
    if "I/O Tensors" in data:
        layout = "11"
        io = [{"name": t.get("Name"), "mode": t.get("IOMode"), "dtype": tensor_precision(t),
               "shape": t.get("Dimensions")} for t in data["I/O Tensors"]]
    else:
        layout = "10"
        io = [{"name": n, "mode": None, "dtype": None, "shape": None} for n in data.get("Bindings", [])]
    rows = []
    for layer in layers:
        rows.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                     "precision": "reformat" if is_reformat(layer) else layer_precision(layer),
                     "inputs": [tensor_precision(t) for t in layer.get("Inputs", []) if isinstance(t, dict)],
                     "outputs": [tensor_precision(t) for t in layer.get("Outputs", []) if isinstance(t, dict)],
                     "tactic": layer.get("TacticName") or layer.get("TacticValue") or ""})
    counts = Counter(r["precision"] for r in rows if r["precision"] != "reformat")
    reformats = [r for r in rows if r["precision"] == "reformat"]
    int8_float = [r for r in reformats if "INT8" in r["inputs"] + r["outputs"]
                  and any(p in r["inputs"] + r["outputs"] for p in ("FP16", "FP32", "BF16"))]
    return {"layout": layout, "layers": len(rows), "precisions": dict(sorted(counts.items())),
            "int8_layers": counts.get("INT8", 0), "fp16_layers": counts.get("FP16", 0),
            "fp32_layers": counts.get("FP32", 0), "reformats": len(reformats),
            "int8_float_reformats": len(int8_float), "engine_mb": round(engine_bytes / 2 ** 20, 3)
            if engine_bytes is not None else None, "io": io, "per_layer": rows}


def format_summary(report, title="engine"):
    """One line: the numbers to compare between the FP16 and the INT8 engine."""
    size = f", {report['engine_mb']:.1f} MB" if report.get("engine_mb") is not None else ""
    other = {k: v for k, v in report["precisions"].items() if k not in ("INT8", "FP16", "FP32")}
    extra = "".join(f", {k} {v}" for k, v in other.items())
    return (f"{title}: {report['layers']} layers: INT8 {report['int8_layers']}, FP16 {report['fp16_layers']}, "
            f"FP32 {report['fp32_layers']}{extra}; {report['reformats']} reformat layers "
            f"({report['int8_float_reformats']} between INT8 and float){size}")


def format_markdown(report, title="engine"):
    lines = [f"# {title}", "", format_summary(report, title), "",
             "| # | layer | type | precision | inputs | outputs |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(report["per_layer"]):
        name = r["name"].replace("|", "/")
        name = name if len(name) <= 120 else name[:117] + "..."
        lines.append(f"| {i} | {name} | {r['type']} | {r['precision']} | {', '.join(r['inputs'])} | "
                     f"{', '.join(r['outputs'])} |")
    return "\n".join(lines) + "\n"


def report_paths(engine_path):
    engine_path = Path(engine_path)
    return engine_path.with_suffix(".report.json"), engine_path.with_suffix(".report.md")


def write_report(report, engine_path):
    """`<engine>.report.json` and `<engine>.report.md` beside the engine; returns both paths."""
    from qat.deploy.files import write_atomic

    js, md = report_paths(engine_path)
    write_atomic(js, json.dumps(report, indent=1))
    write_atomic(md, format_markdown(report, Path(engine_path).name))
    return js, md


def read_report(engine_path):
    """The report written beside an engine, or None."""
    js = report_paths(engine_path)[0]
    return json.loads(js.read_text()) if js.is_file() else None


def main(argv=None):
    """python -m qat.deploy.engine_report LAYERS.json [--engine X.engine]: report of a trtexec
    --exportLayerInfo file (written beside the engine when given, else beside the JSON)."""
    import argparse

    from qat.compat import run_cli

    def _main():
        ap = argparse.ArgumentParser(prog="python -m qat.deploy.engine_report",
                                     description="Per-layer precision and reformat count of a TensorRT engine")
        ap.add_argument("layers", help="IEngineInspector JSON (trtexec --exportLayerInfo, --profilingVerbosity=detailed)")
        ap.add_argument("--engine", default=None, help="the engine file (for its size and where the report goes)")
        opt = ap.parse_args(argv)
        src = Path(opt.layers)
        if not src.is_file():
            raise UserError(f"{src} not found; check the path")
        engine = Path(opt.engine) if opt.engine else src.with_suffix(".engine")
        report = parse_engine_info(src.read_text(), engine.stat().st_size if engine.is_file() else None)
        paths = write_report(report, engine)
        print(format_summary(report, engine.name))
        print(f"report: {paths[0]}, {paths[1]}")
        return 0

    return run_cli(_main)


if __name__ == "__main__":
    raise SystemExit(main())
