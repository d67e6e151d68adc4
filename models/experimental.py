"""Safe checkpoint loading shared by every command.

Checkpoints are pickles. utils/safe_unpickle.py reads them with `torch.load(weights_only=True)`, with
every model class replaced by an inert placeholder: the file can name our model classes, torch layers
and the few numpy / builtin types upstream YOLOv9 checkpoints contain, but it cannot construct or call
any of them; the modules are then assembled from their pickled attributes (never from the file's
constructor arguments or its model yaml). A file that needs anything else is refused before any of
its code can run, with the offending global named. `trusted=True` (CLI: --trusted) opts out for files
the user vouches for.
"""
import _compat_pickle
import io
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from models import common, yolo
from utils import safe_unpickle
from utils.general import LOGGER, UserError

# Every model class the loader knows, unpickled as inert placeholders (utils/safe_unpickle.py).
MODEL_CLASSES = safe_unpickle.module_classes(common, yolo)


def _allowed_names():
    """Dotted names of every global the safe loader accepts: ours plus torch's own weights_only defaults."""
    names = safe_unpickle.allowed_names(MODEL_CLASSES)
    try:  # private, but only used to word the error message; the unpickler itself is the guard
        from torch._weights_only_unpickler import _get_allowed_globals

        names |= set(_get_allowed_globals())
    except Exception:
        pass
    return names


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _py3_name(module, name):
    """Protocol-2 pickles name some builtins the Python 2 way (__builtin__.set); the unpickler maps them."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _globals_in_pickles(data):
    """Dotted names of the globals the pickle(s) in `data` would import, read with pickletools (nothing is
    executed). Handles GLOBAL/INST and protocol-4 STACK_GLOBAL; a legacy torch file is several pickles."""
    stream, names = io.BytesIO(data), []
    for _ in range(8):
        pushed, memo = [], {}  # strings pushed (None for other values), memo of strings, for STACK_GLOBAL
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(_py3_name(*arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    names.append(_py3_name(pushed[-2], pushed[-1]))
                elif op.name in _STRING_OPS:
                    pushed.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.stack_after:
                    pushed.append(None)
        except Exception:  # end of the pickles (a legacy file's raw storage bytes follow them) or garbage
            break
        if stream.tell() >= len(data):
            break
    return names


def _file_globals(path):
    """Globals referenced by a checkpoint's pickle: data.pkl inside a zip checkpoint, else the file itself."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return [g for n in z.namelist() if n.endswith(".pkl") for g in _globals_in_pickles(z.read(n))]
        return _globals_in_pickles(Path(path).read_bytes())
    except Exception:
        return []


def _refused(weights, names):
    names = list(dict.fromkeys(names))  # unique, in order
    shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return UserError(f"weights '{weights}' needs global{'s' if len(names) > 1 else ''} {shown}, not on the safe-load "
                     f"allow-list (nothing was executed); if you trust this file, pass --trusted")


def _first_sentence(e):
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(". ")[0][:160]


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
        except Exception:  # not a (readable) zip checkpoint: the failure path below words the reason
            unsafe = []
        allowed = _allowed_names()
        bad = [g for g in unsafe if g not in allowed]
        if bad:
            raise _refused(weights, bad)
    try:
        if trusted:
            ckpt = torch.load(str(path), map_location=map_location, weights_only=False)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # raw pickles: refused below
                ckpt = safe_unpickle.load(path, MODEL_CLASSES, map_location=map_location)
    except safe_unpickle.RefusedCheckpoint as e:
        raise UserError(f"weights '{weights}' was refused by the safe loader: {_first_sentence(e)} (nothing was "
                        f"executed); if you trust this file, pass --trusted") from None
    except Exception as e:  # whatever the unpickler trips on, the file cannot be loaded as it is
        if not trusted:
            allowed = _allowed_names()
            bad = [g for g in _file_globals(path) if g not in allowed]
            if bad:
                raise _refused(weights, bad) from None
        if isinstance(e, (zipfile.BadZipFile, EOFError)) or "zip archive" in str(e) or "EOF" in str(e):
            raise UserError(f"weights '{weights}' could not be read: truncated or damaged file "
                            f"({_first_sentence(e)}); copy or download it again") from None
        if not trusted and "persistent_load" in str(e):
            raise UserError(f"weights '{weights}' is in the legacy (pre-1.6) torch format that the safe loader cannot "
                            f"read; if you trust this file, pass --trusted") from None
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither a zip archive nor a pickle (PROTO opcode)
            raise UserError(f"weights '{weights}' is not a PyTorch checkpoint (neither a zip archive nor pickle "
                            f"data); pass a .pt file written by torch.save") from None
        raise UserError(f"weights '{weights}' is not a PyTorch checkpoint ({_first_sentence(e)})") from None
    if isinstance(ckpt, nn.Module):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(_pick_model(ckpt), nn.Module):
        raise UserError(f"weights '{weights}' is not a YOLOv9 checkpoint (no 'model' or 'ema' entry holding a model)")
    try:  # save_qat stored upstream fuse()'s per-instance forward bindings as names
        for key in ("model", "ema"):
            safe_unpickle.restore_fused_forward(ckpt.get(key))
    except safe_unpickle.RefusedCheckpoint as e:
        raise UserError(f"weights '{weights}': {e}") from None
    return ckpt


def _pick_model(ckpt):
    """ema when present (upstream's choice), else model."""
    return ckpt["ema"] if ckpt.get("ema") is not None else ckpt.get("model")


def model_from_checkpoint(ckpt, device="cpu", fuse=True, inplace=True):
    """Pick ema (preferred) or model, as float32 on `device`, fused if asked, in eval mode."""
    model = _pick_model(ckpt).to(device).float()
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
