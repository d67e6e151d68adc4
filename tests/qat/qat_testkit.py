"""The test models (one factory for every test), built once per test process where that is slow:

- `fp32_model()`: a micro GELAN (every structure the sharing rules cover, exports in seconds) with
  weights that behave like a trained net's; `qat_model()`, `onnx_path(kind)`: its quantized copy and
  ONNX exports (tests of qat.export / graph / lint / deploy, val_trt.py, benchmarks).
- `fp32_model("gelan-t")`, `unfused_model(...)`, `small_cfg(...)`: a models/detect config with its
  real topology made thin, random weights with data-dependent BatchNorm statistics: one train-mode
  forward on random images with cumulative BN averaging, so after fusing every conv+BN
  pre-activation has the scale a trained network's has (plain random init makes activations vanish
  through 20+ layers, and quantization error with them). Tests of qat.quantize / rules / calibrate /
  finetune / checkpoint and train_qat.py.
- `images()` (structured) and `noise_images()` / `calib_batches()` (uniform noise) as inputs.
"""
import atexit
import shutil
import tempfile
import warnings
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
IMGSZ = 64
NC = 6  # the demo data's classes
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


def fp32_model(cfg_name=None, depth=1, width=8, seed=0):
    """A fused FP32 model (a fresh copy): the micro GELAN of tiny_cfg(), or with `cfg_name` (e.g.
    "gelan-t") small_cfg(cfg_name, depth, width)."""
    if cfg_name is None:
        return deepcopy(_fp32(seed))
    return deepcopy(_thin_fp32(cfg_name, depth, width, seed))


# ---- models/detect configs made thin ----

VAR_FLOOR = 0.25  # data_init's BatchNorm variance floor
CHANNEL_ARGS = {"Conv": 1, "AConv": 1, "ADown": 1, "RepNCSPELAN4": 3, "ELAN1": 3, "SPPELAN": 2, "RepNCSP": 1}


def _thin(c, width):
    return max(8, c // width)


def small_cfg(name="gelan-t", depth=1, width=8):
    """A models/detect config, same topology, made cheap: every RepNCSPELAN4 repeat count set to
    `depth` (0: the config's own) and every channel count divided by `width` (at least 8; CBLinear
    splits and the layers they are added to shrink alike, so CBFuse sums still line up)."""
    from models.yolo import load_model_yaml

    cfg = deepcopy(load_model_yaml(str(ROOT / "models/detect" / f"{name}.yaml")))
    for layer in cfg["backbone"] + cfg["head"]:
        kind, args = layer[2], list(layer[3])
        if depth and kind == "RepNCSPELAN4" and len(args) >= 4:
            args[3] = depth
        if width > 1 and kind in CHANNEL_ARGS:
            args = [_thin(a, width) if k < CHANNEL_ARGS[kind] else a for k, a in enumerate(args)]
        elif width > 1 and kind == "CBLinear":
            args = [[_thin(c, width) for c in args[0]]] + args[1:]
        layer[3] = args
    cfg["nc"] = NC
    return cfg


@torch.no_grad()
def data_init(model, seed=0, imgsz=IMGSZ, n=4):
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, the batch's statistics
        m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.2 + 0.4)
        m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    model.train()
    model(torch.rand(n, 3, imgsz, imgsz, generator=g))  # enough samples per channel even at stride 32
    for m in bns:
        m.momentum = 0.03
        # noise images make deep features nearly constant across samples: a variance floor keeps BN
        # from amplifying image-to-image noise a thousandfold through the neck
        m.running_var.clamp_(min=VAR_FLOOR)
    return model.eval()


@lru_cache(maxsize=None)
def _thin_fp32(cfg_name, depth, width, seed):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(small_cfg(cfg_name, depth, width), nc=NC)
    m.names = [f"c{i}" for i in range(NC)]
    return data_init(m, seed).fuse().eval()


def unfused_model(cfg_name="gelan-t", depth=1, width=8, seed=0):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(small_cfg(cfg_name, depth, width), nc=NC)
    m.names = [f"c{i}" for i in range(NC)]
    return data_init(m, seed)


def save_fp32_checkpoint(path, cfg_name="gelan-t", seed=0, imgsz=IMGSZ):
    """An upstream-style training checkpoint ({'model', 'opt'}) of an unfused random-weights model."""
    from utils.torch_utils import save_atomic

    model = unfused_model(cfg_name, seed=seed)
    save_atomic({"model": model, "ema": None, "epoch": -1, "opt": {"imgsz": imgsz}}, path)
    return Path(path)


def noise_images(n=2, seed=1, imgsz=IMGSZ):
    """Uniform noise images, (n, 3, imgsz, imgsz) in [0, 1]."""
    return torch.rand(n, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))


def tiny_run_inputs(root):
    """{'root', 'data', 'weights'}: tiny demo data (8 train / 4 val, 96 px) and an FP32 checkpoint
    under `root`, the inputs of the train_qat.py end-to-end tests."""
    from utils.demo_data import generate

    data = generate(Path(root) / "data", n_train=8, n_val=4, imgsz=96)
    weights = save_fp32_checkpoint(Path(root) / "fp32.pt", imgsz=IMGSZ)
    return {"root": Path(root), "data": str(data), "weights": str(weights)}


def interrupt_step_at(monkeypatch, n):
    """Make qat.finetune.Trainer.step raise KeyboardInterrupt (Ctrl-C) on its n-th call; returns the
    original step, to put back with monkeypatch.setattr(Trainer, 'step', step)."""
    from qat.finetune import Trainer

    calls = {"n": 0}
    step = Trainer.step

    def dying_step(self, batch, lr):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return step(self, batch, lr)

    monkeypatch.setattr(Trainer, "step", dying_step)
    return step


# ---- inputs, the quantized micro GELAN and its exports ----

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
