"""Export a QAT model to ONNX with TensorRT-style Q/DQ, optionally with NMS inside the graph.

    path = export_qat_onnx(qmodel, "qat_best.onnx", imgsz=640)              # + qat.graph post-process
    path = export_qat_onnx(qmodel, "e2e.onnx", 640, end2end=True, nms="onnx")

The modelopt quantizers export as QuantizeLinear/DequantizeLinear pairs: int8, zero point 0,
activations per tensor, weights per output channel (axis 0). Layers whose quantizers are disabled
(`--no-last-layer`, `--skip-layers`) export without Q/DQ; their names go into the file's metadata
(`float_layers`) so `qat.lint` can check that they stayed float. The plain (no NMS) export
has the contract of export.py's FP32 baseline: `images` (B, 3, H, W) float 0-1 -> `output0`
(B, 4+nc, anchors), metadata `stride` and `names`. (It calls torch.onnx.export itself rather than
export.export_onnx: qat/ is also installed into upstream YOLOv9 clones, whose export_onnx differs.)

end2end: the model's output goes through NMS inside the graph.
- nms='tensorrt': TensorRT's EfficientNMS_TRT plugin node. Outputs `num_dets` (B, 1) int32,
  `det_boxes` (B, max_det, 4) float x1y1x2y2, `det_scores` (B, max_det), `det_classes` (B, max_det)
  int32. Only TensorRT can run it.
- nms='onnx': the standard NonMaxSuppression op (ONNX Runtime, OpenVINO). Output `detections`
  (K, 7) = [image index, x1, y1, x2, y2, confidence, class], the same rows as
  utils.general.non_max_suppression (best class per box, class-aware NMS); at most max_det boxes
  per class and image.

Over 300 lines: the plain and the end2end export (two NMS flavours as autograd functions for
the ONNX symbolics) share the model preparation and the metadata writer.
"""
import json
import re
import warnings
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from qat.compat import UserError

NMS_KINDS = ("onnx", "tensorrt")


def check_export_request(weights, imgsz, batch_size):
    """export.py's and export_qat.py's checks before anything is loaded -> (weights Path, [h, w])."""
    weights = Path(weights)
    if weights.suffix.lower() == ".onnx":
        raise UserError(f"--weights {weights} is already ONNX; pass the PyTorch checkpoint (.pt)")
    imgsz = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    if len(imgsz) not in (1, 2):
        raise UserError(f"--imgsz takes one size or two (h w), got {len(imgsz)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    return weights, imgsz * 2 if len(imgsz) == 1 else imgsz


def _heads(model):
    """Detection heads (DDetect / DualDDetect, ours or upstream's): what has export mode and levels."""
    return [m for m in model.modules() if hasattr(m, "export") and hasattr(m, "nl") and hasattr(m, "stride")]


def _main_head_only(module, args, output):
    """Forward hook on the model: a dual-head model in export mode returns [aux, main]; keep main.
    (A hook, not a wrapper module: parameter and node names stay those of the model.)"""
    return output[-1] if isinstance(output, (list, tuple)) else output


def _quantizers_disabled(module):
    """True when a module's own quantizers (input and weight) are all disabled / absent."""
    qs = [getattr(module, a, None) for a in ("input_quantizer", "weight_quantizer")]
    qs = [q for q in qs if q is not None]
    return all(not q.is_enabled for q in qs)


def float_layers(model):
    """Regexes of the layers that export without Q/DQ: the head under --no-last-layer, the
    --skip-layers patterns, and every individual convolution whose quantizers are disabled."""
    from qat.quantize import head_prefix

    pats = []
    settings = getattr(model, "qat", {}).get("settings", {}) if isinstance(getattr(model, "qat", None), dict) else {}
    if settings.get("no_last_layer"):
        pats.append(re.escape(head_prefix(model)))
    pats += list(settings.get("skip_layers") or [])
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "weight_quantizer") and _quantizers_disabled(m):
            if not any(re.search(p, name) for p in pats):
                pats.append("^" + re.escape(name) + "$")
    return pats


def is_quantized(model):
    """True for a model with modelopt quantizers in it."""
    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError:  # no modelopt: nothing can be quantized
        return False
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# NMS inside the graph


class _OnnxNMS(torch.autograd.Function):
    """Standard ONNX NonMaxSuppression; the forward gives the same selection for tracing."""

    @staticmethod
    def forward(ctx, boxes, scores, max_out, iou, score_thr):
        import torchvision

        rows = []
        k = int(max_out)
        for b in range(boxes.shape[0]):
            for c in range(scores.shape[1]):
                s = scores[b, c]
                keep = torch.nonzero(s > float(score_thr)).flatten()
                if keep.numel():
                    sel = keep[torchvision.ops.nms(boxes[b, keep], s[keep], float(iou))][:k]
                    rows.append(torch.stack([torch.full_like(sel, b), torch.full_like(sel, c), sel], 1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_out, iou, score_thr):
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score_thr, center_point_box_i=0)


class _TrtEfficientNMS(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT plugin (only TensorRT runs it): the forward returns tensors of the
    right shapes and types for tracing, the symbolic writes the plugin node."""

    @staticmethod
    def forward(ctx, boxes, scores, iou, score_thr, max_det):
        b = boxes.shape[0]
        return (torch.randint(0, max_det, (b, 1), dtype=torch.int32), torch.rand(b, max_det, 4),
                torch.rand(b, max_det), torch.randint(0, scores.shape[2], (b, max_det), dtype=torch.int32))

    @staticmethod
    def symbolic(g, boxes, scores, iou, score_thr, max_det):
        return g.op("TRT::EfficientNMS_TRT", boxes, scores, background_class_i=-1, box_coding_i=0,
                    iou_threshold_f=float(iou), max_output_boxes_i=int(max_det), plugin_version_s="1",
                    score_activation_i=0, score_threshold_f=float(score_thr), outputs=4)


class End2End(nn.Module):
    """model (export mode, (B, 4+nc, N) xywh + scores) followed by NMS."""

    def __init__(self, model, nms="onnx", max_det=100, iou_thres=0.45, conf_thres=0.25):
        super().__init__()
        if nms not in NMS_KINDS:
            raise UserError(f"--nms {nms} is unknown: use one of {', '.join(NMS_KINDS)}")
        self.model, self.nms = model, nms
        self.max_det, self.iou_thres, self.conf_thres = int(max_det), float(iou_thres), float(conf_thres)

    def forward(self, x):
        return self.nms_head(self.model, (x,), self.model(x))

    def nms_head(self, module, args, y):
        """NMS on the model's export-mode output; also usable as the model's forward hook."""
        x = args[0]
        y = y[-1] if isinstance(y, (list, tuple)) else y  # DualDDetect: the main head
        xy, wh, scores = y[:, :2], y[:, 2:4], y[:, 4:]
        boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1).transpose(1, 2)  # (B, N, 4) x1y1x2y2
        if self.nms == "tensorrt":
            return _TrtEfficientNMS.apply(boxes, scores.transpose(1, 2).contiguous(), self.iou_thres,
                                          self.conf_thres, self.max_det)
        conf, cls = scores.max(1, keepdim=True)  # best class per box, as non_max_suppression(multi_label=False)
        classes = torch.arange(scores.shape[1], device=x.device).view(1, -1, 1)
        masked = torch.where(classes == cls, conf, torch.zeros_like(scores))
        sel = _OnnxNMS.apply(boxes, masked, torch.tensor([self.max_det]), torch.tensor([self.iou_thres]),
                             torch.tensor([self.conf_thres]))
        n = boxes.shape[1]
        flat = sel[:, 0] * n + sel[:, 2]
        det_boxes = boxes.reshape(-1, 4)[flat]
        det_conf = conf.reshape(-1)[flat]
        return torch.cat((sel[:, :1].float(), det_boxes, det_conf[:, None], sel[:, 1:2].float()), 1)


# --------------------------------------------------------------------------------------------------
# Export


def _add_metadata(path, meta):
    import onnx

    from qat.graph import save_onnx

    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for k, v in meta.items():
        value = v if isinstance(v, str) else json.dumps(v)
        if k in existing:
            existing[k].value = value
        else:
            m.metadata_props.add(key=k, value=value)
    save_onnx(m, path)


def _names(model):
    """Class names as a list: valid JSON and a Python literal, so upstream's eval() of the value
    (DetectMultiBackend) reads it as well as our JSON readers."""
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return [str(v) for v in (names or [])]


def _export_plain(model, path, imgsz, batch_size, dynamic, opset, simplify):
    """torch.onnx.export with export.py's contract; `dynamic`: batch, height and width (the head then
    computes its anchors in the graph)."""
    import onnx

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    p = next(model.parameters())
    im = torch.zeros(batch_size, 3, h, w, device=p.device, dtype=torch.float32)
    heads = _heads(model)
    if not heads:
        raise UserError("the model has no DDetect/DualDDetect head; only detection models export")
    saved = [(m, m.export, getattr(m, "dynamic", False)) for m in heads]
    hook = model.register_forward_hook(_main_head_only)
    try:
        for m in heads:
            m.export, m.dynamic = True, dynamic
        model.eval()
        with torch.no_grad():
            y = model(im)  # dry run: builds the anchors, checks the output
        if not isinstance(y, torch.Tensor) or y.ndim != 3:
            raise UserError(f"the model's export-mode output is {type(y).__name__}, not one (B, 4+nc, anchors) tensor")
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}} \
            if dynamic else None
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # modelopt and the tracer warn about traced shape checks
            torch.onnx.export(model, im, str(path), opset_version=opset, do_constant_folding=True,
                              input_names=["images"], output_names=["output0"], dynamic_axes=axes, dynamo=False)
    finally:
        hook.remove()
        for m, e, d in saved:
            m.export, m.dynamic = e, d
    if simplify:
        simplify_onnx(path)
    onnx.checker.check_model(str(path))
    return path


def simplify_onnx(path):
    """onnxslim in place; without onnxslim a warning and the file unchanged."""
    import onnx

    from utils.general import LOGGER  # upstream clones have it too

    try:
        import onnxslim
    except ImportError:
        LOGGER.warning("WARNING: --simplify needs onnxslim (pip install onnxslim); exported without simplifying")
        return path
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    return path


def _export_end2end(model, path, imgsz, batch_size, dynamic, opset, nms, max_det, iou_thres, conf_thres):
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    p = next(model.parameters())
    im = torch.zeros(batch_size, 3, h, w, device=p.device, dtype=torch.float32)
    heads = _heads(model)
    saved = [(m, m.export) for m in heads]
    e2e = End2End(model, nms, max_det, iou_thres, conf_thres)
    hook = model.register_forward_hook(e2e.nms_head)  # NMS traced after the model, names unchanged
    try:
        for m in heads:
            m.export = True
        model.eval()
        if nms == "tensorrt":
            outputs = ["num_dets", "det_boxes", "det_scores", "det_classes"]
            axes = {k: {0: "batch"} for k in ["images"] + outputs} if dynamic else None
        else:
            outputs = ["detections"]
            axes = {"images": {0: "batch"}, "detections": {0: "detections"}} if dynamic else \
                {"detections": {0: "detections"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, im, str(path), opset_version=opset, do_constant_folding=True,
                              input_names=["images"], output_names=outputs, dynamic_axes=axes, dynamo=False)
    finally:
        hook.remove()
        for m, e in saved:
            m.export = e
    return path


def export_qat_onnx(model, path, imgsz=640, batch_size=1, dynamic=False, opset=17, end2end=False, nms="onnx",
                    simplify=False, max_det=100, iou_thres=0.45, conf_thres=0.25, postprocess=True, extra_meta=None):
    """Export a (QAT or plain) model to `path` and return the Path.

    The model is not changed (a copy is exported). `dynamic`: dynamic batch (and, without end2end,
    height/width as export.export_onnx does). With postprocess=True the file is run through
    qat.graph.postprocess (its report is stored in the metadata key `graph_report`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if opset < 13:
        raise UserError(f"--opset {opset} is too old for per-channel Q/DQ: use 13 or newer (17 recommended)")
    if end2end and nms not in NMS_KINDS:
        raise UserError(f"--nms {nms} is unknown: use one of {', '.join(NMS_KINDS)}")
    quantized = is_quantized(model)
    if quantized:
        from qat.quantize import uncalibrated_quantizers  # modelopt is there when the model is quantized

        uncalibrated = uncalibrated_quantizers(model)
    if quantized and uncalibrated:
        raise UserError(f"{len(uncalibrated)} enabled quantizer(s) have no calibrated range (first: {uncalibrated[0]}):"
                        f" calibrate the model (train_qat.py) or disable them, then export")
    m = deepcopy(model).float().eval()
    if not quantized and hasattr(m, "fuse") and hasattr(m, "is_fused") and not m.is_fused():
        m.fuse()
    if end2end:
        _export_end2end(m, path, imgsz, batch_size, dynamic, opset, nms, max_det, iou_thres, conf_thres)
    else:
        _export_plain(m, path, imgsz, batch_size, dynamic, opset, simplify)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    stride = getattr(m, "stride", None)
    settings = getattr(m, "qat", {}).get("settings", {}) if isinstance(getattr(m, "qat", None), dict) else {}
    meta = {"stride": int(max(stride)) if stride is not None else 32,  # export.py's (upstream's) keys
            "qat": "1" if quantized else "0", "strides": [int(s) for s in stride] if stride is not None else [8, 16, 32],
            "names": _names(m), "imgsz": [int(h), int(w)], "batch": int(batch_size), "dynamic": bool(dynamic),
            "head": f"model.{len(m.model) - 1}" if hasattr(m, "model") else "",
            "end2end": nms if end2end else "", "float_layers": float_layers(m) if quantized else [],
            "weight_bits": int(settings.get("weight_bits", 8)) if quantized else 32,
            "residual_quant": settings.get("residual_quant", "both") if quantized else "",
            "producer": "yolov9-qat qat.export"}
    meta.update(extra_meta or {})
    if end2end:
        meta.update({"max_det": max_det, "iou_thres": iou_thres, "conf_thres": conf_thres})
    _add_metadata(path, meta)
    if postprocess and quantized:
        from qat.graph import postprocess as run_postprocess

        report = run_postprocess(path)
        _add_metadata(path, {"graph_report": {k: v for k, v in report.items() if k != "scale_changes"}
                             | {"scale_changes": len(report["scale_changes"])}})
    return path
