"""Models for the tests of qat.quantize / rules / calibrate / finetune / checkpoint and train_qat.py.

Random weights with data-dependent BatchNorm statistics: one train-mode forward on random images
with cumulative BN averaging, so after fusing every conv+BN pre-activation has the scale a trained
network's has (plain random init makes activations vanish through 20+ layers, and quantization
error with them)."""
from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
IMGSZ = 64
NC = 6  # the demo data's classes
VAR_FLOOR = 0.25


def small_cfg(name="gelan-t", depth=1):
    """A models/detect config with every RepNCSPELAN4's repeat count set to `depth` (structure
    kept; depth=0: the config's own counts)."""
    from models.yolo import load_model_yaml

    cfg = deepcopy(load_model_yaml(str(ROOT / "models/detect" / f"{name}.yaml")))
    for layer in cfg["backbone"] + cfg["head"]:
        if depth and layer[2] == "RepNCSPELAN4" and len(layer[3]) >= 4:
            layer[3] = list(layer[3][:3]) + [depth]
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
def _fp32(cfg_name, depth, seed):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(small_cfg(cfg_name, depth), nc=NC)
    m.names = [f"c{i}" for i in range(NC)]
    return data_init(m, seed).fuse().eval()


def fp32_model(cfg_name="gelan-t", depth=1, seed=0):
    """Fused FP32 model (a fresh copy). depth=0: the config's own repeat counts."""
    return deepcopy(_fp32(cfg_name, depth, seed))


def unfused_model(cfg_name="gelan-t", depth=1, seed=0):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(small_cfg(cfg_name, depth), nc=NC)
    m.names = [f"c{i}" for i in range(NC)]
    return data_init(m, seed)


def save_fp32_checkpoint(path, cfg_name="gelan-t", seed=0, imgsz=IMGSZ):
    """An upstream-style training checkpoint ({'model', 'opt'}) of an unfused random-weights model."""
    from utils.torch_utils import save_atomic

    model = unfused_model(cfg_name, seed=seed)
    save_atomic({"model": model, "ema": None, "epoch": -1, "opt": {"imgsz": imgsz}}, path)
    return Path(path)


def images(n=2, seed=1, imgsz=IMGSZ):
    return torch.rand(n, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))
