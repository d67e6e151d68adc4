"""Validate a deployed INT8 model (TensorRT engine, OpenVINO, ONNX Runtime) beside the PyTorch model.

    python val_trt.py --weights qat_best.onnx --data data/demo.yaml --checkpoint qat_best.pt   # auto backend
    python val_trt.py --weights fp32.onnx qat_best.onnx --data data/coco.yaml      # FP32 baseline beside INT8
    python val_trt.py --weights qat_best.onnx --data data/coco.yaml --backend openvino --no-reference
    python val_trt.py --weights qat_best.engine --data data/coco.yaml --batch-size 8
    python val_trt.py --weights qat_best_openvino_model --data data/coco.yaml   # export_qat.py --include openvino
(--onnx FILE / --engine FILE are aliases of --weights FILE; a .pt beside them is the --checkpoint.)

Every row runs through val.run on the same images (one dataloader, square --imgsz letterbox), so
the table compares like with like: PyTorch FP32 and QAT fake-quant (from --checkpoint: a QAT
checkpoint gives both rows, a plain one the FP32 row), for each Q/DQ file ONNX Runtime (its
numerical reference; --no-reference skips it) and the deployed backend, for each float ONNX its FP32
baseline row. Q/DQ files are linted first (qat.lint) and refused when they break a rule. auto = tensorrt when TensorRT and
a GPU are here, else openvino (activation form and weight bits chosen for this CPU and printed:
int8 on AMX, uint8 on VNNI / AVX2, 7-bit weights without VNNI; --act-form and --vnni override); an
OpenVINO IR folder (export_qat.py --include openvino) runs on openvino as exported. The deployed mAP50-95 is checked against the reference (ONNX Runtime, else the
fake-quant model): a difference above --tolerance is reported. Results: runs/val_trt/<name>/
results.md and results.json.
"""
import inspect
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qat.compat import UserError, atomic_output, run_cli  # noqa: E402  (installed into upstream clones too: see patches/README.md)
from utils.cli import (ArgumentParser, add_device_arg, add_trusted_flag, cli_main, imgsz_int, nonneg_float,  # noqa: E402
                       nonneg_int, positive_int, probability)
from utils.general import LOGGER, check_dataset, check_img_size, colorstr, increment_path  # noqa: E402


def _vnni(value):
    return {"auto": None, "yes": True, "no": False}[value]


def _is_qat_weights(weights, trusted):
    if not weights:
        return False
    from qat.checkpoint import is_qat_checkpoint
    from qat.compat import load_checkpoint

    return is_qat_checkpoint(load_checkpoint(weights, trusted=trusted))


def _pytorch_rows(weights, device, trusted):
    """[(label, model)] from --weights: FP32 (quantizers off) and QAT fake-quant, or FP32 alone."""
    from qat.checkpoint import is_qat_checkpoint, load_qat
    from qat.compat import attempt_load, load_checkpoint

    if not weights:
        return []
    if not is_qat_checkpoint(load_checkpoint(weights, trusted=trusted)):
        return [("PyTorch FP32", attempt_load(weights, device=device, fuse=True, trusted=trusted))]
    from copy import deepcopy

    from qat.quantize import set_quant_enabled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel, _, _ = load_qat(weights, device=device, trusted=trusted)
    fp32 = set_quant_enabled(deepcopy(qmodel), False)
    return [("PyTorch FP32 (quantizers off)", fp32), ("PyTorch QAT fake-quant", qmodel)]


def _row(label, backend_desc, r, latency_ms=None):
    """A table row from val.run's upstream-style return ((mp, mr, map50, map, *losses), maps, times)."""
    (mp, mr, map50, map_, *_), _, times = r
    return {"model": label, "runtime": backend_desc, "P": float(mp), "R": float(mr), "mAP50": float(map50),
            "mAP50-95": float(map_), "ms_per_img": float(times[1]), "ms_per_call": latency_ms}


def _onnx_nc(path):
    """The classes an ONNX predicts: 4 + nc channels in its one (B, 4+nc, anchors) output; None for
    other layouts (NMS inside the graph)."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.output[0].type.tensor_type.shape.dim if len(graph.output) == 1 else []
    return dims[1].dim_value - 4 if len(dims) == 3 and dims[1].HasField("dim_value") else None


def _check_dataset(data, task):
    """The data yaml as a dict; ours checks only the split used, upstream's has no such option."""
    try:
        return check_dataset(data, required=(task,))
    except TypeError:  # upstream YOLOv9's check_dataset(data, autodownload=True)
        return check_dataset(data)


def format_table(rows, ref=None):
    lines = ["| model | runtime | P | R | mAP50 | mAP50-95 | vs reference | inference ms/img |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{r['mAP50-95'] - ref:+.4f}" if ref is not None else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['P']:.3f} | {r['R']:.3f} | {r['mAP50']:.4f} | "
                     f"{r['mAP50-95']:.4f} | {delta} | {r['ms_per_img']:.1f} |")
    return "\n".join(lines)


MODEL_SUFFIXES = (".pt", ".onnx", ".engine")


def _models(weights, onnx, engine, checkpoint):
    """(PyTorch checkpoints, deployable files) from --weights (upstream's convention: model.pt |
    model.onnx | model.engine, one or more), the --onnx / --engine aliases and --checkpoint."""
    given = [Path(w) for w in ([weights] if isinstance(weights, (str, Path)) else list(weights or []))]
    given += [Path(f) for f in (onnx, engine) if f]
    for f in given:
        if f.is_dir() or f.suffix.lower() == ".xml":  # an OpenVINO IR (export_qat.py --include openvino)
            continue
        if f.suffix.lower() not in MODEL_SUFFIXES:
            raise UserError(f"--weights {f}: use a .pt checkpoint, an .onnx or a TensorRT .engine file")
    checkpoints = [f for f in given if f.suffix.lower() == ".pt"]
    checkpoints += [Path(c) for c in ([checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint or []))]
    files = [f for f in given if f.suffix.lower() != ".pt"]
    if not checkpoints and not files:
        raise UserError("pass a model: --weights model.onnx | model.engine | model.pt (or --onnx FILE / --engine FILE)")
    for f in checkpoints + files:
        if not f.is_file() and not (f.is_dir() and _ir(f)):
            raise UserError(f"{f} not found; check the path")
    return checkpoints, files


def _ir(path):
    """The IR .xml of an OpenVINO model folder or file, else None."""
    from qat.deploy.openvino import ir_xml

    return ir_xml(path) if Path(path).exists() else None


def _refuse_broken(path):
    """qat.lint on a Q/DQ file before anything runs it: a half-written export, zero / NaN / negative
    scales or broken Q/DQ rules are refused with the list (on the log), one line on the CLI."""
    from qat.lint import lint

    violations = lint(path, expect_qdq=False)
    if violations:
        for line in violations[:50]:
            LOGGER.info(f"lint: {line}")
        more = " (first 50 listed above)" if len(violations) > 50 else " (listed above)"
        raise UserError(f"{path}: qat.lint found {len(violations)} Q/DQ rule violation(s){more}: refusing to "
                        f"validate it; export the checkpoint again with export_qat.py")


def _deployables(files, checkpoints, trusted):
    """[(path, metadata, quantized)] for the deployable files (ONNX, engine, OpenVINO IR folder); a QAT
    model without Q/DQ nodes or a Q/DQ file that breaks a lint rule is refused before anything runs it."""
    from qat.deploy import require_qdq
    from qat.deploy.openvino import ir_metadata
    from qat.graph import metadata, qdq_counts

    deployables = []
    for f in files:
        ir = _ir(f) if f.suffix.lower() not in (".onnx", ".engine") else None
        if ir is not None:  # exported by export_qat.py (linted then); its yaml says what it holds
            meta = ir_metadata(ir)
            deployables.append((f, meta, str(meta.get("qat", "1")) == "1"))
            continue
        meta = metadata(f) if f.suffix == ".onnx" else {}
        quantized = f.suffix == ".engine" or sum(qdq_counts(f).values()) > 0
        # a QAT model (by its metadata, or the one file given beside a QAT checkpoint) must come with Q/DQ
        if f.suffix == ".onnx" and not quantized and (str(meta.get("qat", "0")) == "1" or (
                len(files) == 1 and any(_is_qat_weights(c, trusted) for c in checkpoints))):
            require_qdq(f)
        if f.suffix == ".onnx" and quantized:
            _refuse_broken(f)
        deployables.append((f, meta, quantized))
    return deployables


def _check_classes(deployables, data):
    """Each ONNX must predict the data yaml's number of classes."""
    for f, _, _ in deployables:
        onnx_nc = _onnx_nc(f) if f.suffix == ".onnx" else None
        if onnx_nc is not None and onnx_nc != int(data["nc"]):
            raise UserError(f"{f.name} predicts {onnx_nc} classes but the data yaml has {data['nc']}: "
                            f"pass the --data the model was trained on")


def _square_dataloader(data, task, imgsz, batch_size, workers):
    """One loader for every row: square --imgsz letterbox (what a static-shape deployed model takes)."""
    from utils.dataloaders import create_dataloader

    # our scan skips (and counts) labels of a class >= nc; an upstream clone's create_dataloader has no nc
    scan_nc = {"nc": int(data["nc"])} if "nc" in inspect.signature(create_dataloader).parameters else {}
    return create_dataloader(data[task], imgsz, batch_size, 32, pad=0.0, rect=False, workers=workers,
                             prefix=colorstr(f"{task}: "), **scan_nc)[0]


def _deployed_rows(rows, extra, evaluate, path, quantized, backend, n_files, batch_size, threads, vnni, act_form,
                   reference, tolerance):
    """Append the rows of one deployable file (ONNX Runtime reference for a Q/DQ ONNX, then the deployed
    backend) to `rows`, its notes to `extra` -> (deployed model, reference row name, delta, engine report).
    The reference is ONNX Runtime, else the fake-quant row (INT8) or an FP32 PyTorch row (float ONNX)."""
    from qat.deploy import load_backend

    suffix = f" {path.name}" if n_files > 1 else ""
    deployed = load_backend(backend, path, threads=threads, vnni=_vnni(vnni), act_form=act_form)
    static_batch = deployed.batch
    if static_batch and batch_size > static_batch:
        LOGGER.info(f"{path.name} has a static batch of {static_batch}: running in chunks of {static_batch}")
    ref_name = None
    if reference and quantized and path.suffix == ".onnx" and backend != "onnxruntime":  # not an IR folder
        ort = load_backend("onnxruntime", path, threads=threads)
        rows.append(evaluate("ONNX Runtime (reference)" + suffix, ort.describe(), ort, ort.latency_ms))
        ref_name = rows[-1]["model"]
    label = f"deployed ({backend})" if quantized else f"FP32 baseline ({backend})"
    rows.append(evaluate(label + suffix, deployed.describe(), deployed, deployed.latency_ms))
    if ref_name is None:
        ref_name = next((r["model"] for r in rows if "fake-quant" in r["model"]), None) if quantized else \
            next((r["model"] for r in rows if "FP32" in r["model"] and r is not rows[-1]), None)
    ref = next((r["mAP50-95"] for r in rows if r["model"] == ref_name), None)
    if backend == "openvino" and quantized:
        c = deployed.conv_precisions()
        extra.append(f"OpenVINO runtime model of {path.name}: {c['int8']}/{c['total']} convolutions in INT8")
        if getattr(deployed, "choice", None) is not None:
            extra.append(f"OpenVINO INT8 form: {deployed.choice.describe()}")
    engine_report = getattr(deployed, "report", None) if backend == "tensorrt" else None
    if engine_report:  # per-layer precisions of the built engine (qat.deploy.engine_report)
        from qat.deploy.engine_report import format_summary

        extra.append(format_summary(engine_report, f"TensorRT engine of {path.name}"))
    delta = rows[-1]["mAP50-95"] - ref if ref is not None else None
    if delta is not None:
        ok = abs(delta) <= tolerance
        extra.append(f"{rows[-1]['model']} vs {ref_name}: mAP50-95 {delta:+.4f} ({'within' if ok else 'OUTSIDE'} "
                     f"the {tolerance} tolerance)")
        if not ok:
            LOGGER.warning(f"WARNING: {rows[-1]['model']}'s mAP50-95 differs from {ref_name} by {delta:+.4f}: "
                           f"run benchmarks/bench_agreement.py to tell an engine that computes something else "
                           f"from the val set's noise floor (too few images for this tolerance)")
    return deployed, ref_name, delta, engine_report


def run(data, weights=None, onnx=None, engine=None, checkpoint=None, imgsz=None, batch_size=1, backend="auto",
        device="cpu", workers=4, threads=None, vnni="auto", act_form="auto", reference=True, conf_thres=0.001, iou_thres=0.7,
        task="val", tolerance=0.002, project=ROOT / "runs/val_trt", name="exp", exist_ok=False, trusted=False):
    """Validate every model given; returns {'rows': [...], 'reference': name or None, 'deployed_delta':
    float or None (of the last deployed file), ...}.

    weights: model(s) as upstream's val.py takes them (.pt | .onnx | .engine); onnx / engine: aliases;
    checkpoint: PyTorch checkpoint(s) for the PyTorch rows (a .pt in `weights` beside a deployed file is
    taken as that too). A float ONNX (export.py) gives the FP32 baseline rows, a Q/DQ one the INT8 rows."""
    import val as validate
    from qat.deploy import resolve_backend
    from utils.torch_utils import select_device

    checkpoints, files = _models(weights, onnx, engine, checkpoint)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    irs = [f for f in files if f.suffix.lower() not in (".onnx", ".engine")]  # OpenVINO IR folders
    backend = resolve_backend("tensorrt" if backend == "auto" and any(f.suffix == ".engine" for f in files)
                              else "openvino" if backend == "auto" and irs else backend)
    if irs and backend != "openvino":
        raise UserError(f"{irs[0]} is an OpenVINO IR: use --backend openvino (or pass the ONNX)")
    if backend == "tensorrt" and files:  # say so before the dataset scan, not after it
        from qat.deploy import tensorrt_available

        ok, why = tensorrt_available()
        if not ok:
            raise UserError(f"backend 'tensorrt' is not available here: {why}; use --backend openvino (CPU)")
    deployables = _deployables(files, checkpoints, trusted)
    if imgsz is None:
        imgsz = int(max(next((m.get("imgsz") for _, m, _ in deployables if m.get("imgsz")), None) or [640]))
    imgsz = check_img_size(imgsz, s=32)
    data = _check_dataset(data, task)
    _check_classes(deployables, data)
    dataloader = _square_dataloader(data, task, imgsz, batch_size, workers)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)  # inputs are good
    dev = select_device(device, batch_size=batch_size)

    def evaluate(label, desc, model, latency=None):
        LOGGER.info(f"\n{colorstr(label)}: {desc}")
        r = validate.run(data, batch_size=batch_size, imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres,
                         task=task, model=model, dataloader=dataloader, plots=False, half=False)
        return _row(label, desc, r, latency() if latency else None)

    rows = []
    for c in checkpoints:
        for label, model in _pytorch_rows(c, dev, trusted):
            rows.append(evaluate(label + (f" {c.name}" if len(checkpoints) > 1 else ""), f"torch {dev.type}", model))
    ref_name, delta, extra, deployed, engine_report = None, None, [], None, None
    for path, _meta, quantized in deployables:
        deployed, ref_name, delta, engine_report = _deployed_rows(
            rows, extra, evaluate, path, quantized, backend, len(deployables), batch_size, threads, vnni, act_form,
            reference, tolerance)
    result = {"rows": rows, "reference": ref_name, "deployed_delta": delta, "backend": backend if files else None,
              "model": str(files[-1] if files else checkpoints[-1]), "models": [str(f) for f in checkpoints + files],
              "imgsz": imgsz, "batch_size": batch_size}
    if files and backend == "openvino":
        result["cpu"] = getattr(deployed, "cpu", None)
        result["act_form"] = deployed.choice.to_dict() if getattr(deployed, "choice", None) else None
    if engine_report:
        result["engine_report"] = {k: v for k, v in engine_report.items() if k != "per_layer"}
    _write_results(save_dir, rows, ref_name, extra, result, checkpoints + files, data.get(task))
    return result


def _write_results(save_dir, rows, ref_name, extra, result, models, split):
    """results.md (the table against the reference row, then the notes) and results.json, atomically."""
    ref = next((r["mAP50-95"] for r in rows if r["model"] == ref_name), None)
    table = format_table(rows, ref)
    names = ", ".join(f.name for f in models)
    text = "\n".join([f"# val_trt: {names} on {Path(str(split))}", "", table, ""] + extra) + "\n"
    with atomic_output(save_dir / "results.md") as tmp:
        tmp.write_text(text)
    with atomic_output(save_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    LOGGER.info("\n" + table + "\n" + "\n".join(extra) + f"\nResults saved to {colorstr('bold', save_dir)}")


def parse_opt(argv=None):
    parser = ArgumentParser(description="mAP and latency of a deployed INT8 model beside PyTorch FP32 / QAT")
    parser.add_argument("--weights", nargs="+", type=str, default=None,
                        help="model(s) as upstream's val.py: model.onnx (float from export.py or Q/DQ from "
                             "export_qat.py), model.engine, model.pt; several give one table")
    parser.add_argument("--onnx", type=str, default=None, help="alias: --weights FILE.onnx")
    parser.add_argument("--engine", type=str, default=None, help="alias: --weights FILE.engine")
    parser.add_argument("--checkpoint", nargs="+", type=str, default=None,
                        help="PyTorch checkpoint(s) for the PyTorch rows (FP32; a QAT one adds fake-quant)")
    parser.add_argument("--data", type=str, required=True, help="dataset.yaml path")
    parser.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=None,
                        help="inference size (default: the ONNX's, else 640)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size")
    parser.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "openvino", "onnxruntime"),
                        help="auto: tensorrt where TensorRT and a GPU are there, else openvino")
    add_device_arg(parser, help="device of the PyTorch rows: cpu or cuda index")
    parser.add_argument("--workers", type=nonneg_int, default=4, help="max dataloader workers")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for OpenVINO / ONNX Runtime")
    parser.add_argument("--act-form", default="auto", choices=("auto", "int8", "uint8", "measure"),
                        help="openvino: activation form (auto = chosen for this CPU; measure = time both)")
    parser.add_argument("--vnni", default="auto", choices=("auto", "yes", "no"),
                        help="OpenVINO: does the CPU have VNNI/AMX (no -> 7-bit weights); auto reads /proc/cpuinfo")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the ONNX Runtime reference row (slow on large sets)")
    parser.add_argument("--conf-thres", type=probability, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=probability, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--task", default="val", choices=("train", "val", "test"), help="split to evaluate")
    parser.add_argument("--tolerance", type=nonneg_float, default=0.002, help="allowed |deployed - reference| mAP50-95")
    parser.add_argument("--project", default=str(ROOT / "runs/val_trt"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    add_trusted_flag(parser)
    return parser.parse_args(argv)


main = cli_main(parse_opt, run, run_cli)  # main(argv=None)


if __name__ == "__main__":
    main()
