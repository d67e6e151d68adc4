"""Small quantized models and their ONNX exports, shared by the tests of qat.export / graph / lint /
deploy and val_trt.py. Each artifact is built once per test process (exports take seconds)."""
import atexit
import shutil
import tempfile
import warnings
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

IMGSZ = 64
NC = 6
NAMES = ["circle", "rectangle", "triangle", "star", "cross", "ring"]  # utils.demo_data classes
_TMP = Path(tempfile.mkdtemp(prefix="qat-testkit-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def tiny_cfg():
    """A micro GELAN with every structure the rules cover (ELAN1, RepNCSPELAN4 + RepNCSP + residual
    Add, AConv, ADown with its MaxPool, SPPELAN, Upsample + Concat neck, 3-level DDetect) and a
    graph small enough to export in a few seconds."""
    return {"nc": NC, "depth_multiple": 1.0, "width_multiple": 1.0,
            "backbone": [[-1, 1, "Conv", [16, 3, 2]],  # 0-P1/2
                         [-1, 1, "Conv", [32, 3, 2]],  # 1-P2/4
                         [-1, 1, "ELAN1", [32, 32, 16]],  # 2
                         [-1, 1, "AConv", [48]],  # 3-P3/8
                         [-1, 1, "RepNCSPELAN4", [48, 48, 24, 1]],  # 4
                         [-1, 1, "ADown", [64]],  # 5-P4/16
                         [-1, 1, "RepNCSPELAN4", [64, 64, 32, 1]],  # 6
                         [-1, 1, "AConv", [96]],  # 7-P5/32
                         [-1, 1, "SPPELAN", [96, 48]]],  # 8
            "head": [[-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 9
                     [[-1, 6], 1, "Concat", [1]],  # 10
                     [-1, 1, "ELAN1", [64, 64, 32]],  # 11
                     [[4, 11, 8], 1, "DDetect", ["nc"]]]}  # 12


def _smooth_init(model, seed):
    """Random weights that behave like a trained net's: BN statistics spread, conv gain below one
    (so a rounding difference in one layer fades instead of growing through 20 layers), soft box
    distributions, class biases spread so that some boxes score above 0.25."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 1.5 - 0.5)
            elif isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 * (2.0 / fan_in) ** 0.5)
        head = model.model[-1]
        for seq in head.cv2:  # soft box distributions: the DFL expectation moves smoothly, never by whole bins
            seq[-1].weight.mul_(0.1)
        for seq in head.cv3:
            seq[-1].bias.copy_(torch.rand(seq[-1].bias.shape, generator=g) * 8 - 6)
            seq[-1].weight.mul_(8)
    return model


@lru_cache(maxsize=None)
def _fp32(seed=0):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(tiny_cfg(), nc=NC)
    m.names = list(NAMES)
    return _smooth_init(m, seed).fuse().eval()


def fp32_model(seed=0):
    return deepcopy(_fp32(seed))


def calib_batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, IMGSZ, IMGSZ, generator=g) for _ in range(n)]


def images(n=2, seed=2):
    """Float 0-1 images with structure (a gradient and a few flat boxes): unlike pure noise they give
    the detector distinct peaks instead of many neighbouring anchors with near-equal scores."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, IMGSZ)
    x = 0.3 + 0.4 * (ramp.view(1, 1, -1, 1) * torch.rand(n, 3, 1, 1, generator=g) +
                     ramp.view(1, 1, 1, -1) * torch.rand(n, 3, 1, 1, generator=g)) / 2
    for i in range(n):
        for _ in range(3):
            x0, y0 = torch.randint(0, IMGSZ - 16, (2,), generator=g).tolist()
            w, h = torch.randint(8, 28, (2,), generator=g).tolist()
            x[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    return (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@lru_cache(maxsize=None)
def _qat(no_last_layer=False, weight_bits=8):
    from qat.calibrate import calibrate
    from qat.quantize import quantize_model
    from qat.settings import QuantSettings

    settings = QuantSettings(no_last_layer=no_last_layer, weight_bits=weight_bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantize_model(fp32_model(), settings)
        calibrate(m, calib_batches(), settings, show=False)
    return m.eval()


def qat_model(no_last_layer=False, weight_bits=8):
    """A quantized + calibrated copy (qat.quantize_model with the rules)."""
    return deepcopy(_qat(no_last_layer, weight_bits))


@lru_cache(maxsize=None)
def _onnx(kind):
    from qat.export import export_qat_onnx
    from qat.graph import postprocess

    path = _TMP / f"{kind}.onnx"
    if kind == "fp32":
        export_qat_onnx(fp32_model(), path, IMGSZ, batch_size=2)
    elif kind == "qat_raw":  # as torch.onnx wrote it, before qat.graph
        export_qat_onnx(_qat(), path, IMGSZ, batch_size=2, postprocess=False)
    elif kind == "qat":
        shutil.copy(_onnx("qat_raw"), path)
        postprocess(path)
    elif kind == "qat_w7":
        export_qat_onnx(_qat(weight_bits=7), path, IMGSZ, batch_size=2)
    elif kind == "qat_nll":  # --no-last-layer: the head in float
        export_qat_onnx(_qat(no_last_layer=True), path, IMGSZ, batch_size=2)
    elif kind == "e2e_onnx":
        export_qat_onnx(_qat(), path, IMGSZ, batch_size=2, end2end=True, nms="onnx", conf_thres=0.25)
    elif kind == "e2e_trt":  # the plugin node does not depend on quantization: the fast FP32 model
        export_qat_onnx(fp32_model(), path, IMGSZ, batch_size=1, end2end=True, nms="tensorrt", max_det=50)
    else:
        raise KeyError(kind)
    return path


def onnx_path(kind, dest=None):
    """Path of an export of kind fp32 | qat_raw | qat | qat_w7 | qat_nll | e2e_onnx | e2e_trt, built once per
    process; copied into the folder `dest` when given (for a test that changes the file)."""
    p = _onnx(kind)
    if dest is None:
        return p
    out = Path(dest) / p.name
    shutil.copy(p, out)
    return out


def export_mode(model):
    """The model with its head in export mode: forward -> (B, 4+nc, anchors)."""
    model.model[-1].export = True
    return model


def assert_same_detections(dets, refs, min_iou=0.95, conf_tol=0.01):
    """Per image, the same number of detections and each one matched by a reference detection of
    the same class (IoU >= min_iou, confidence within conf_tol); order may differ where two
    confidences are nearly equal. dets/refs: lists of (n, 6) [x1, y1, x2, y2, conf, cls]."""
    from utils.metrics import box_iou

    assert len(dets) == len(refs)
    for d, r in zip(dets, refs):
        assert len(d) == len(r), f"{len(d)} detections vs {len(r)}"
        if not len(d):
            continue
        iou = box_iou(d[:, :4], r[:, :4])
        ok = (iou >= min_iou) & (d[:, 5:6] == r[:, 5].view(1, -1)) & ((d[:, 4:5] - r[:, 4].view(1, -1)).abs() <= conf_tol)
        used = set()
        for i in range(len(d)):
            j = next((j for j in ok[i].nonzero().flatten().tolist() if j not in used), None)
            assert j is not None, f"detection {d[i].tolist()} has no match in the reference"
            used.add(j)


def val_inputs(folder):
    """(data yaml, qat_best.pt): 4 demo val images at IMGSZ and the quantized test model's checkpoint
    under `folder`, the inputs of the val_trt.py and bench_agreement tests."""
    from qat.checkpoint import save_qat
    from utils.demo_data import generate

    data = generate(Path(folder) / "demo", n_train=0, n_val=4, imgsz=IMGSZ, seed=0)
    ckpt = Path(folder) / "qat_best.pt"
    save_qat(ckpt, qat_model())
    return data, ckpt


def run_ort(path_or_model, x):
    """ONNX Runtime with every graph optimization off: the graph as written (even ORT_ENABLE_BASIC
    already removes double Q/DQ, propagates Q/DQ and folds constants). First output, numpy."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]



def assert_same_nms(y, ref, min_iou=0.95):
    """Raw outputs y and ref give the same detections after NMS (conf 0.25), with enough of them to mean it."""
    from utils.general import non_max_suppression

    a, b = non_max_suppression(y, 0.25, 0.45), non_max_suppression(ref, 0.25, 0.45)
    assert sum(len(d) for d in b) > 2
    assert_same_detections(a, b, min_iou=min_iou)
