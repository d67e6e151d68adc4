"""Export a QAT checkpoint to a Q/DQ ONNX that TensorRT and OpenVINO run in INT8 (a plain checkpoint
exports as the FP32 baseline).

    python export_qat.py --weights runs/qat/exp/weights/qat_best.pt                  # -> qat_best.onnx
    python export_qat.py --weights qat_best.pt --no-last-layer --dynamic
    python export_qat.py --weights qat_best.pt --end2end --nms tensorrt             # -> qat_best-end2end.onnx
    python export_qat.py --weights qat_best.pt --include onnx openvino              # + qat_best_openvino_model/

The file is written beside the weights, then post-processed by qat.graph (shared scales verified,
duplicate Q/DQ merged, modelopt's float casts and dead nodes removed) and checked by qat.lint; the
command prints the path, size, Q/DQ counts and both reports, and fails when lint finds a violation.
--end2end puts NMS inside the graph: TensorRT's EfficientNMS_TRT plugin (--nms tensorrt; outputs
num_dets, det_boxes, det_scores, det_classes) or the standard ONNX NonMaxSuppression (--nms onnx;
output `detections` (K, 7) = image, x1, y1, x2, y2, conf, class). --nms auto picks tensorrt when
TensorRT and a GPU are here, else onnx.

--include (upstream export.py's convention) names what to write; the ONNX is always written, every
other kind is made from it by one writer in WRITERS: `openvino` -> `<stem>_openvino_model/` (IR in the
INT8 form chosen for this CPU, or --act-form / --vnni; metadata `<stem>.yaml`), written to a temporary
folder and renamed into place; `engine trtexec deepstream triton`: the TensorRT engine (+ report; a
one-line skip without TensorRT and a GPU), a trtexec command file for TensorRT 10 and 11, a DeepStream
nvinfer config and a Triton model folder, all beside the ONNX (qat.deploy.files).
"""
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qat.compat import UserError, atomic_output, run_cli  # noqa: E402  (installed into upstream clones too: see patches/README.md)
from utils.cli import (ArgumentParser, add_export_args, add_trusted_flag, cli_main, positive_int,  # noqa: E402
                       probability)
from utils.general import LOGGER, check_img_size, colorstr, file_size  # noqa: E402


def _drop_head_quantizers(model):
    """--no-last-layer on a checkpoint trained with a quantized head: every quantizer slot of the
    head gets a disabled quantizer of its own (as qat.quantize does for skipped layers), so a
    quantizer the head shares with other layers stays active there."""
    from qat.quantize import disable_slots, head_prefix

    n = len(disable_slots(model, [head_prefix(model)]))
    if isinstance(getattr(model, "qat", None), dict):
        model.qat.setdefault("settings", {})["no_last_layer"] = True
    return n


def load_for_export(weights, device="cpu", no_last_layer=False, trusted=False):
    """(model, is_qat): a QAT checkpoint -> the quantized model (qat.checkpoint.load_qat); a plain
    one -> the fused FP32 model."""
    from qat.checkpoint import is_qat_checkpoint, load_qat
    from qat.compat import attempt_load, load_checkpoint

    ckpt = load_checkpoint(weights, trusted=trusted)
    if is_qat_checkpoint(ckpt):
        del ckpt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modelopt import chatter
            model, settings, _ = load_qat(weights, device=device, trusted=trusted)
        if no_last_layer and not settings.no_last_layer:
            n = _drop_head_quantizers(model)
            LOGGER.info(f"--no-last-layer: {n} quantizer slots of the head disabled; the head exports in float")
        return model.eval(), True
    del ckpt
    if no_last_layer:
        LOGGER.warning("WARNING: --no-last-layer ignored: a plain checkpoint exports as FP32 without any Q/DQ")
    return attempt_load(weights, device=device, fuse=True, trusted=trusted), False


def _write_openvino(onnx_path, opt):
    """<stem>_openvino_model/ from the exported ONNX (qat.deploy.openvino.export_ir)."""
    from qat.deploy.openvino import export_ir

    if opt.get("end2end"):
        raise UserError("--include openvino takes the raw model: export without --end2end")
    r = export_ir(onnx_path, act_form=opt.get("act_form", "auto"), vnni=_vnni(opt.get("vnni", "auto")),
                  threads=opt.get("threads"))
    form = f", {r['choice'].describe()}" if r["choice"] else " (FP32)"
    LOGGER.info(f"{colorstr('OpenVINO:')} saved {r['path']} ({r['size_mb']:.1f} MB .bin, {r['convs']['int8']}/"
                f"{r['convs']['total']} convolutions INT8){form}")
    return {"path": str(r["path"]), "size_mb": r["size_mb"], "convs": r["convs"],
            "choice": r["choice"].to_dict() if r["choice"] else None}


def _deploy_file_writer(kind):
    """A WRITERS entry for one of qat.deploy.files' kinds (engine, trtexec, deepstream, triton)."""
    def write(onnx_path, opt):
        from qat.deploy.files import DEPLOY_WRITERS

        return DEPLOY_WRITERS[kind](onnx_path, engine_path=opt.get("engine"), max_batch=opt.get("max_batch"))
    return write


# --include kinds: name -> writer(onnx_path, options dict) -> result. The ONNX itself is always written
# first; adding a kind is one entry here.
DEPLOY_KINDS = ("engine", "trtexec", "deepstream", "triton")
WRITERS = {"openvino": _write_openvino, **{kind: _deploy_file_writer(kind) for kind in DEPLOY_KINDS}}


def _vnni(value):
    return {"auto": None, "yes": True, "no": False}[value]


def run(weights, imgsz=(640,), batch_size=1, dynamic=False, opset=17, simplify=False, device="cpu",
        no_last_layer=False, end2end=False, nms="auto", topk_all=100, iou_thres=0.45, conf_thres=0.25,
        trusted=False, include=("onnx",), act_form="auto", vnni="auto", threads=None, max_batch=None):
    """Export; returns a dict: path, qat, size_mb, qdq counts, graph report, lint violations, and one
    entry per extra --include kind (the TensorRT-side files under 'deploy')."""
    from qat.deploy import tensorrt_available
    from qat.export import check_export_request, export_qat_onnx, float_layers
    from qat.graph import format_report, postprocess, qdq_counts
    from qat.lint import lint, summary
    from utils.torch_utils import select_device

    weights, imgsz = check_export_request(weights, imgsz, batch_size)
    include = [k.lower() for k in (include or ["onnx"])]
    unknown = [k for k in include if k != "onnx" and k not in WRITERS]
    if unknown:
        raise UserError(f"--include {' '.join(unknown)}: unknown; use any of onnx {' '.join(WRITERS)}")
    if nms not in ("auto", "tensorrt", "onnx"):
        raise UserError(f"--nms {nms} is unknown: use auto, tensorrt or onnx")
    if end2end and nms == "auto":
        nms = "tensorrt" if tensorrt_available()[0] else "onnx"
    model, is_qat = load_for_export(weights, select_device(device), no_last_layer, trusted)
    imgsz = check_img_size(imgsz, s=int(max(model.stride)))
    out = weights.with_name(weights.stem + ("-end2end" if end2end else "") + ".onnx")
    kind = "QAT Q/DQ" if is_qat else "FP32"
    LOGGER.info(f"{colorstr('ONNX:')} exporting {weights} as {kind} ONNX, opset {opset}, input "
                f"{batch_size}x3x{imgsz[0]}x{imgsz[1]}{' (dynamic)' if dynamic else ''}"
                f"{f', NMS inside ({nms})' if end2end else ''}...")
    result = {"path": str(out), "qat": is_qat, "graph": None, "lint": []}
    with atomic_output(out) as tmp:  # `out` is replaced only by a file that passed post-process and lint
        export_qat_onnx(model, tmp, imgsz, batch_size=batch_size, dynamic=dynamic, opset=opset, end2end=end2end,
                        nms=nms, simplify=simplify, max_det=topk_all, iou_thres=iou_thres, conf_thres=conf_thres,
                        postprocess=False)
        if is_qat:
            report = postprocess(tmp)
            result["graph"] = report
            LOGGER.info(format_report(report))
            result["lint"] = lint(tmp, float_layers=float_layers(model))  # the checkpoint's settings
            if result["lint"]:
                for line in result["lint"]:
                    LOGGER.info(f"lint: {line}")
                raise UserError(f"qat.lint found {len(result['lint'])} Q/DQ rule violation(s), listed above: "
                                f"{out} not written" + (" (the previous file is kept)" if out.exists() else ""))
            s = summary(tmp)
        counts = qdq_counts(tmp)
    result.update(size_mb=file_size(out), qdq=counts)
    LOGGER.info(f"{colorstr('ONNX:')} saved {out} ({result['size_mb']:.1f} MB), "
                f"{counts['QuantizeLinear']} QuantizeLinear / {counts['DequantizeLinear']} DequantizeLinear")
    if is_qat:
        LOGGER.info(f"lint: ok ({s['pairs']} Q/DQ pairs, {s['groups']} shared-scale groups, "
                    f"{s['int8_convs']}/{s['convs']} convolutions INT8)")
    options = {"end2end": end2end, "act_form": act_form, "vnni": vnni, "threads": threads, "imgsz": imgsz,
               "batch_size": batch_size, "dynamic": dynamic, "max_batch": max_batch, "engine": None}
    # in the order given, each once; the engine first, so that a Triton folder can pack it
    for kind in sorted(dict.fromkeys(k for k in include if k != "onnx"), key=lambda k: k != "engine"):
        r = WRITERS[kind](out, options)
        if kind in DEPLOY_KINDS:
            result.setdefault("deploy", {})[kind] = r
            LOGGER.info(f"{colorstr(kind + ':')} {r}")
            if kind == "engine" and not isinstance(r, str):
                options["engine"] = r
        else:
            result[kind] = r
    return result


def parse_opt(argv=None):
    parser = ArgumentParser(description="Export a QAT checkpoint to Q/DQ ONNX (a plain one to FP32 ONNX), "
                                                 "written beside the weights")
    add_export_args(parser, weights_help="QAT (or plain) checkpoint (.pt)",
                    dynamic_help="dynamic batch (and h/w without --end2end)")
    parser.add_argument("--no-last-layer", action="store_true", help="export the detection head without Q/DQ")
    parser.add_argument("--end2end", action="store_true", help="NMS inside the graph (writes <weights>-end2end.onnx)")
    parser.add_argument("--nms", default="auto", choices=("auto", "tensorrt", "onnx"),
                        help="end2end NMS: TensorRT EfficientNMS_TRT plugin or standard ONNX NonMaxSuppression")
    parser.add_argument("--topk-all", type=positive_int, default=100,
                        help="end2end: max detections per image (per class "
                                                                   "for --nms onnx)")
    parser.add_argument("--iou-thres", type=probability, default=0.45, help="end2end: NMS IoU threshold")
    parser.add_argument("--conf-thres", type=probability, default=0.25, help="end2end: confidence threshold")
    parser.add_argument("--include", nargs="+", default=["onnx"], choices=("onnx",) + tuple(WRITERS),
                        help="what to write: onnx (always written); openvino (IR folder); engine (TensorRT, GPU), "
                             "trtexec, deepstream, triton (files beside the ONNX)")
    parser.add_argument("--act-form", default="auto", choices=("auto", "int8", "uint8", "measure"),
                        help="openvino: activation form (auto = chosen for this CPU; measure = time both)")
    parser.add_argument("--vnni", default="auto", choices=("auto", "yes", "no"),
                        help="openvino: target CPU has VNNI/AMX (no -> 7-bit weights); auto = this CPU")
    parser.add_argument("--threads", type=positive_int, default=None, help="openvino: threads when timing the forms")
    parser.add_argument("--max-batch", type=positive_int, default=None,
                        help="dynamic exports: largest batch of the TensorRT profile and Triton's max_batch_size "
                             "(default 32)")
    add_trusted_flag(parser)
    return parser.parse_args(argv)


main = cli_main(parse_opt, run, run_cli)  # main(argv=None)


if __name__ == "__main__":
    main()
