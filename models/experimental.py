"""Safe checkpoint loading shared by every command.

Checkpoints are pickles. `torch.load(weights_only=True)` only rebuilds the globals on an allow-list:
here, our model classes and the few torch / numpy / builtin types upstream YOLOv9 checkpoints contain.
A file that needs anything else is refused before any of its code can run, with the offending
global named. `trusted=True` (CLI: --trusted) opts out for files the user vouches for.
"""
import argparse
import collections
import pathlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models import common, yolo
from utils.general import LOGGER, UserError

_TORCH_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish, nn.ReLU6, nn.Identity,
                  nn.Sequential, nn.ModuleList, nn.Upsample, nn.MaxPool2d, nn.AvgPool2d)
_OUR_MODULES = tuple(v for v in vars(common).values() if isinstance(v, type) and issubclass(v, nn.Module)) + (
    yolo.DetectionModel, yolo.DDetect, yolo.DualDDetect)


def _numpy_globals():
    """numpy objects found in upstream checkpoints (best_fitness arrays, numpy scalars in `opt`),
    registered under both numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) import paths."""
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(mod, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    for dtype_cls in (np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Float16DType, np.dtypes.Int64DType,
                      np.dtypes.Int32DType, np.dtypes.BoolDType, np.dtypes.UInt8DType):
        out.append(dtype_cls)
    return out


def safe_globals():
    """The allow-list for weights_only loading."""
    extra = [collections.OrderedDict, set, argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
             ]
    return list(_OUR_MODULES) + list(_TORCH_MODULES) + _numpy_globals() + extra


def load_checkpoint(weights, trusted=False, map_location="cpu"):
    """Read a checkpoint file into a dict. All failure modes are one-line UserErrors."""
    path = Path(weights)
    if not path.exists():
        raise UserError(f"weights file '{weights}' not found; check the path (nothing is downloaded here)")
    if path.is_dir():
        raise UserError(f"weights '{weights}' is a directory; pass a .pt file")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"weights '{weights}' is an ONNX file; pass a PyTorch checkpoint (.pt)")
    if path.stat().st_size == 0:
        raise UserError(f"weights file '{weights}' is empty")
    if not trusted:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: torch.load below gives the precise reason
            unsafe = []
        allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in safe_globals()}
        allowed |= {f"{g.__module__}.{g.__name__}" for g in _OUR_MODULES + _TORCH_MODULES}
        bad = [g for g in unsafe if g not in allowed]
        if bad:
            raise UserError(f"weights '{weights}' needs global '{bad[0]}' which is not on the safe-load allow-list "
                            f"(nothing was executed); if you trust this file, pass --trusted")
    try:
        if trusted:
            ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_globals()):
                ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "not an allowed global" in str(e):
            raise UserError(f"weights '{weights}' was refused by the safe loader ({first[:200]}); "
                            f"if you trust this file, pass --trusted") from None
        raise UserError(f"weights '{weights}' is not a PyTorch checkpoint ({first[:200]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"weights '{weights}' could not be read: truncated or not a checkpoint ({msg[:200]})") from None
    if isinstance(ckpt, nn.Module):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        raise UserError(f"weights '{weights}' is not a YOLOv9 checkpoint (no 'model' or 'ema' entry holding a model)")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", fuse=True, inplace=True):
    """Pick ema (preferred) or model, as float32 on `device`, fused if asked, in eval mode."""
    model = (ckpt.get("ema") or ckpt["model"]).to(device).float()
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    if hasattr(model, "names") and isinstance(model.names, (list, tuple)):
        model.names = dict(enumerate(model.names))
    if fuse and hasattr(model, "fuse"):
        model.fuse()
    for m in model.modules():
        if type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = inplace
        elif type(m) is nn.Upsample and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model.eval()


def attempt_load(weights, device="cpu", inplace=True, fuse=True, trusted=False):
    """Load one checkpoint (upstream train.py or reparameterized layout) as a float eval model."""
    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            raise UserError("model ensembles are not supported; pass one weights file")
        weights = weights[0]
    model = model_from_checkpoint(load_checkpoint(weights, trusted=trusted), device, fuse=fuse, inplace=inplace)
    LOGGER.debug(f"loaded {weights}")
    return model
