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
def _fp32(cfg_name, depth, width, seed):
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(small_cfg(cfg_name, depth, width), nc=NC)
    m.names = [f"c{i}" for i in range(NC)]
    return data_init(m, seed).fuse().eval()


def fp32_model(cfg_name="gelan-t", depth=1, width=8, seed=0):
    """Fused FP32 model (a fresh copy) of small_cfg(cfg_name, depth, width)."""
    return deepcopy(_fp32(cfg_name, depth, width, seed))


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


def images(n=2, seed=1, imgsz=IMGSZ):
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
