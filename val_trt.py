"""Validate a deployed INT8 model (TensorRT engine, OpenVINO, ONNX Runtime) beside the PyTorch model.

    python val_trt.py --onnx qat_best.onnx --data data/demo.yaml --weights qat_best.pt       # auto backend
    python val_trt.py --onnx qat_best.onnx --data coco.yaml --backend openvino --no-reference
    python val_trt.py --engine qat_best.engine --data coco.yaml --batch-size 8

Every row runs through val.run on the same images (one dataloader, square --imgsz letterbox), so
the table compares like with like: PyTorch FP32 and QAT fake-quant (from --weights: a QAT
checkpoint gives both rows, a plain one the FP32 row), ONNX Runtime (the numerical reference of
the Q/DQ file; --no-reference skips it) and the deployed backend. auto = tensorrt when TensorRT and
a GPU are here, else openvino (u8 activations, 7-bit weights on CPUs without VNNI; --vnni overrides
the detection). The deployed mAP50-95 is checked against the reference (ONNX Runtime, else the
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

from qat.compat import UserError, run_cli  # noqa: E402  (installed into upstream clones too: see patches/README.md)
from utils.cli import ArgumentParser, imgsz_int, nonneg_float, nonneg_int, positive_int, probability  # noqa: E402
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


def run(data, onnx=None, engine=None, weights=None, imgsz=None, batch_size=1, backend="auto", device="cpu",
        workers=4, threads=None, vnni="auto", reference=True, conf_thres=0.001, iou_thres=0.7, task="val",
        tolerance=0.002, project=ROOT / "runs/val_trt", name="exp", exist_ok=False, trusted=False):
    """Validate; returns {'rows': [...], 'reference': name or None, 'deployed_delta': float or None}."""
    import val as validate
    from qat.deploy import load_backend, require_qdq, resolve_backend
    from qat.graph import metadata
    from utils.dataloaders import create_dataloader
    from utils.torch_utils import select_device

    if bool(onnx) == bool(engine):
        raise UserError("pass one model to deploy: --onnx FILE or --engine FILE")
    model_path = Path(onnx or engine)
    if not model_path.is_file():
        raise UserError(f"{'--onnx' if onnx else '--engine'} {model_path} not found; check the path")
    backend = resolve_backend("tensorrt" if engine and backend == "auto" else backend)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    meta = metadata(model_path) if onnx else {}
    if onnx and (str(meta.get("qat", "1")) == "1" or _is_qat_weights(weights, trusted)):
        require_qdq(model_path)  # a QAT model (by its metadata or its --weights) must come with Q/DQ
    quantized = str(meta.get("qat", "1")) == "1"
    if imgsz is None:
        imgsz = int(max(meta.get("imgsz") or [640]))
    imgsz = check_img_size(imgsz, s=32)
    data = _check_dataset(data, task)
    onnx_nc = _onnx_nc(model_path) if onnx else None
    if onnx_nc is not None and onnx_nc != int(data["nc"]):
        raise UserError(f"{model_path.name} predicts {onnx_nc} classes but the data yaml has {data['nc']}: "
                        f"pass the --data the model was trained on")
    deployed = load_backend(backend, model_path, threads=threads, vnni=_vnni(vnni))
    static_batch = deployed.batch
    if static_batch and batch_size > static_batch:
        LOGGER.info(f"{model_path.name} has a static batch of {static_batch}: running in chunks of {static_batch}")
    # our scan skips (and counts) labels of a class >= nc; an upstream clone's create_dataloader has no nc
    scan_nc = {"nc": int(data["nc"])} if "nc" in inspect.signature(create_dataloader).parameters else {}
    dataloader = create_dataloader(data[task], imgsz, batch_size, 32, pad=0.0, rect=False, workers=workers,
                                   prefix=colorstr(f"{task}: "), **scan_nc)[0]
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)  # inputs are good
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
    if reference and onnx and backend != "onnxruntime":
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
    (save_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    LOGGER.info("\n" + table + "\n" + "\n".join(extra) + f"\nResults saved to {colorstr('bold', save_dir)}")
    return result


def parse_opt(argv=None):
    parser = ArgumentParser(description="mAP and latency of a deployed INT8 model beside PyTorch FP32 / QAT")
    parser.add_argument("--onnx", type=str, default=None, help="exported ONNX (export_qat.py)")
    parser.add_argument("--engine", type=str, default=None, help="TensorRT engine (instead of --onnx)")
    parser.add_argument("--data", type=str, required=True, help="dataset.yaml path")
    parser.add_argument("--weights", type=str, default=None, help="checkpoint for the PyTorch rows (optional)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=None,
                        help="inference size (default: the ONNX's, else 640)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size")
    parser.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "openvino", "onnxruntime"),
                        help="auto: tensorrt where TensorRT and a GPU are there, else openvino")
    parser.add_argument("--device", default="cpu", help="device of the PyTorch rows: cpu or cuda index")
    parser.add_argument("--workers", type=nonneg_int, default=4, help="max dataloader workers")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for OpenVINO / ONNX Runtime")
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
