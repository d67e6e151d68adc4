"""Validate a deployed INT8 model (TensorRT engine, OpenVINO, ONNX Runtime) beside the PyTorch model.

    python val_trt.py --onnx qat_best.onnx --data data/demo.yaml --weights qat_best.pt       # auto backend
    python val_trt.py --onnx qat_best.onnx --data coco.yaml --backend openvino --no-reference
    python val_trt.py --engine qat_best.engine --data coco.yaml --batch-size 8
    python val_trt.py --onnx qat_best_openvino_model --data coco.yaml            # export_qat.py --include openvino

Every row runs through val.run on the same images (one dataloader, square --imgsz letterbox), so
the table compares like with like: PyTorch FP32 and QAT fake-quant (from --weights: a QAT
checkpoint gives both rows, a plain one the FP32 row), ONNX Runtime (the numerical reference of
the Q/DQ file; --no-reference skips it) and the deployed backend. auto = tensorrt when TensorRT and
a GPU are here, else openvino (activation form and weight bits chosen for this CPU and printed:
int8 on AMX, uint8 on VNNI / AVX2, 7-bit weights without VNNI; --act-form and --vnni override). --onnx
also takes an OpenVINO IR folder (export_qat.py --include openvino), run as exported. The deployed mAP50-95 is checked against the reference (ONNX Runtime, else the
fake-quant model): a difference above --tolerance is reported. Results: runs/val_trt/<name>/
results.md and results.json.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qat.compat import UserError, run_cli  # noqa: E402  (installed into upstream clones too: see patches/README.md)
from utils.general import LOGGER, check_dataset, check_img_size, colorstr, increment_path, print_args  # noqa: E402


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


def run(data, onnx=None, engine=None, weights=None, imgsz=None, batch_size=1, backend="auto", device="cpu",
        workers=4, threads=None, vnni="auto", act_form="auto", reference=True, conf_thres=0.001, iou_thres=0.7, task="val",
        tolerance=0.002, project=ROOT / "runs/val_trt", name="exp", exist_ok=False, trusted=False):
    """Validate; returns {'rows': [...], 'reference': name or None, 'deployed_delta': float or None}."""
    import val as validate
    from qat.deploy import load_backend, require_qdq, resolve_backend
    from qat.deploy.openvino import ir_metadata, ir_xml
    from qat.graph import metadata
    from utils.dataloaders import create_dataloader
    from utils.torch_utils import select_device

    if bool(onnx) == bool(engine):
        raise UserError("pass one model to deploy: --onnx FILE or --engine FILE")
    model_path = Path(onnx or engine)
    ir = ir_xml(model_path) if onnx and model_path.exists() else None  # an OpenVINO IR folder / .xml
    if not model_path.is_file() and ir is None:
        raise UserError(f"{'--onnx' if onnx else '--engine'} {model_path} not found; check the path")
    backend = resolve_backend("tensorrt" if engine and backend == "auto" else "openvino" if ir and backend == "auto"
                              else backend)
    if ir is not None and backend != "openvino":
        raise UserError(f"{model_path} is an OpenVINO IR: use --backend openvino (or pass the ONNX)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    meta = ir_metadata(ir) if ir else metadata(model_path) if onnx else {}
    if onnx and not ir and (str(meta.get("qat", "1")) == "1" or _is_qat_weights(weights, trusted)):
        require_qdq(model_path)  # a QAT model (by its metadata or its --weights) must come with Q/DQ
    quantized = str(meta.get("qat", "1")) == "1"
    if imgsz is None:
        imgsz = int(max(meta.get("imgsz") or [640]))
    imgsz = check_img_size(imgsz, s=32)
    data = _check_dataset(data, task)
    deployed = load_backend(backend, model_path, threads=threads, vnni=_vnni(vnni), act_form=act_form)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    static_batch = deployed.batch
    if static_batch and batch_size > static_batch:
        LOGGER.info(f"{model_path.name} has a static batch of {static_batch}: running in chunks of {static_batch}")
    dataloader = create_dataloader(data[task], imgsz, batch_size, 32, pad=0.0, rect=False, workers=workers,
                                   prefix=colorstr(f"{task}: "))[0]
    dev = select_device(device, batch_size=batch_size)

    def evaluate(label, desc, model, latency=None):
        LOGGER.info(f"\n{colorstr(label)}: {desc}")
        r = validate.run(data, batch_size=batch_size, imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres,
                         task=task, model=model, dataloader=dataloader, plots=False, half=False)
        return _row(label, desc, r, latency() if latency else None)

    rows = []
    for label, model in _pytorch_rows(weights, dev, trusted):
        rows.append(evaluate(label, f"torch {dev.type}", model))
    ref_name = None
    if reference and onnx and not ir and backend != "onnxruntime":
        ort = load_backend("onnxruntime", model_path, threads=threads)
        rows.append(evaluate("ONNX Runtime (reference)", ort.describe(), ort, ort.latency_ms))
        ref_name = rows[-1]["model"]
    rows.append(evaluate(f"deployed ({backend})", deployed.describe(), deployed, deployed.latency_ms))
    if ref_name is None:
        ref_name = next((r["model"] for r in rows if "fake-quant" in r["model"]), None) if quantized else \
            next((r["model"] for r in rows if "FP32" in r["model"]), None)
    ref = next((r["mAP50-95"] for r in rows if r["model"] == ref_name), None)
    table = format_table(rows, ref)
    extra = []
    if backend == "openvino" and quantized:
        c = deployed.conv_precisions()
        extra.append(f"OpenVINO runtime model: {c['int8']}/{c['total']} convolutions in INT8")
        if deployed.choice is not None:
            extra.append(f"OpenVINO INT8 form: {deployed.choice.describe()}")
    delta = rows[-1]["mAP50-95"] - ref if ref is not None else None
    if delta is not None:
        ok = abs(delta) <= tolerance
        extra.append(f"deployed vs {ref_name}: mAP50-95 {delta:+.4f} ({'within' if ok else 'OUTSIDE'} "
                     f"the {tolerance} tolerance)")
        if not ok:
            LOGGER.warning(f"WARNING: the deployed model's mAP50-95 differs from {ref_name} by {delta:+.4f}: "
                           f"run benchmarks/bench_agreement.py to tell an engine that computes something else "
                           f"from the val set's noise floor (too few images for this tolerance)")
    text = "\n".join([f"# val_trt: {model_path.name} on {Path(str(data.get(task)))}", "", table, ""] + extra) + "\n"
    (save_dir / "results.md").write_text(text)
    result = {"rows": rows, "reference": ref_name, "deployed_delta": delta, "backend": backend,
              "model": str(model_path), "imgsz": imgsz, "batch_size": batch_size}
    if backend == "openvino":
        result["cpu"] = getattr(deployed, "cpu", None)
        result["act_form"] = deployed.choice.to_dict() if getattr(deployed, "choice", None) else None
    (save_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    LOGGER.info("\n" + table + "\n" + "\n".join(extra) + f"\nResults saved to {colorstr('bold', save_dir)}")
    return result


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="mAP and latency of a deployed INT8 model beside PyTorch FP32 / QAT")
    parser.add_argument("--onnx", type=str, default=None, help="exported ONNX (export_qat.py)")
    parser.add_argument("--engine", type=str, default=None, help="TensorRT engine (instead of --onnx)")
    parser.add_argument("--data", type=str, required=True, help="dataset.yaml path")
    parser.add_argument("--weights", type=str, default=None, help="checkpoint for the PyTorch rows (optional)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                        help="inference size (default: the ONNX's, else 640)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--backend", default="auto", help="auto | tensorrt | openvino | onnxruntime")
    parser.add_argument("--device", default="cpu", help="device of the PyTorch rows: cpu or cuda index")
    parser.add_argument("--workers", type=int, default=4, help="max dataloader workers")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for OpenVINO / ONNX Runtime")
    parser.add_argument("--vnni", default="auto", choices=("auto", "yes", "no"),
                        help="OpenVINO: does the CPU have VNNI/AMX (no -> 7-bit weights); auto reads /proc/cpuinfo "
                             "and ONEDNN_MAX_CPU_ISA")
    parser.add_argument("--act-form", default="auto", choices=("auto", "int8", "uint8", "measure"),
                        help="OpenVINO: activation Q/DQ form (auto = by this CPU's ISA, else timed; measure = time "
                             "both)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the ONNX Runtime reference row (slow on large sets)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--task", default="val", choices=("train", "val", "test"), help="split to evaluate")
    parser.add_argument("--tolerance", type=float, default=0.002, help="allowed |deployed - reference| mAP50-95")
    parser.add_argument("--project", default=str(ROOT / "runs/val_trt"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--trusted", action="store_true",
                        help="load a checkpoint that needs globals outside the safe-load allow-list (runs its code)")
    return parser.parse_args(argv)


def main(argv=None):
    def _main():
        opt = parse_opt(argv)
        print_args(vars(opt))
        return run(**vars(opt))

    return run_cli(_main)


if __name__ == "__main__":
    main()
