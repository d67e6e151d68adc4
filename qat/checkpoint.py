"""QAT checkpoints: an upstream-style dict that the safe loader accepts.

    {'model': fused FP32 DetectionModel (no quantizer modules pickled),
     'qat': {'version': 1, 'settings': QuantSettings as a dict,
             'quantizer_state': {quantizer name: amax tensor}, 'disabled': [names of disabled quantizers],
             'groups': [[names sharing one quantizer]]},
     'epoch', 'iteration', 'best_fitness', 'optimizer', 'history', 'opt', 'date', ...}

Only our model classes, torch.nn layers, tensors and plain Python types are pickled, so
`models.experimental.load_checkpoint` reads it with weights_only=True and no new allow-list entry.
Upstream's fuse() (inside a clone) sets `m.forward = m.forward_fuse` per instance, a bound method that
pickles as `getattr`: save_qat removes those bindings and lists the modules in the model's
`fused_forward_modules` attribute; load_checkpoint binds them again (utils/safe_unpickle.py).
`load_qat` rebuilds the quantizers with `quantize_model` (same settings, same structure -> same
names and groups) and restores every amax, giving exactly the fake-quant outputs that were saved.
"""
from datetime import datetime
from pathlib import Path

import torch

from qat.compat import UserError, load_checkpoint, save_atomic
from qat.quantize import (disable_quantizers, disabled_quantizers, float_copy, load_quantizer_state, quantize_model,
                          quantizer_state)
from qat.settings import QuantSettings
from utils.safe_unpickle import strip_fused_forward

QAT_VERSION = 1


def is_qat_checkpoint(ckpt):
    """True for a dict that claims to be written by save_qat (export uses this to pick the Q/DQ
    path). Any 'qat' entry counts, so a damaged one is refused by validate_qat_entry instead of
    the file silently passing as a plain FP32 checkpoint."""
    return isinstance(ckpt, dict) and ckpt.get("qat") is not None


def validate_qat_entry(ckpt, path):
    """Check what load_qat reads from a QAT checkpoint (it can come from anywhere): the model and
    the 'qat' entry's version, settings, quantizer amax values and groups. A damaged one is a
    UserError naming the entry, never a traceback from deep inside or a model without Q/DQ."""
    def damaged(what):
        raise UserError(f"'{path}': {what}; the QAT checkpoint is damaged: use another one (e.g. the run's "
                        f"qat_last.pt) or make it again with train_qat.py")

    if not isinstance(ckpt.get("model"), torch.nn.Module):
        damaged(f"'model' is {type(ckpt.get('model')).__name__}, not a model")
    entry = ckpt.get("qat")
    if not isinstance(entry, dict):
        damaged(f"'qat' is {type(entry).__name__}, not a dict")
    version = entry.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= QAT_VERSION:
        damaged(f"'qat' version {version!r} is not one this code reads (1..{QAT_VERSION})")
    settings = entry.get("settings")
    if not isinstance(settings, dict) or not settings:
        damaged(f"'qat.settings' is {settings!r:.40}, not a dict of quantization settings")
    try:
        QuantSettings.from_dict(settings)
    except UserError as e:
        damaged(f"'qat.settings': {e}")
    except (TypeError, ValueError) as e:
        damaged(f"'qat.settings' has a value of the wrong type ({e})")
    state = entry.get("quantizer_state")
    if not isinstance(state, dict) or not state:
        damaged("'qat.quantizer_state' is not a non-empty dict of quantizer name -> amax")
    for name, amax in state.items():
        if not isinstance(name, str) or not isinstance(amax, torch.Tensor) or not amax.is_floating_point():
            damaged(f"'qat.quantizer_state' entry {name!r:.60} is not a name -> float amax tensor")
        if not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
            damaged(f"the amax of quantizer {name} is not finite and >= 0 ({amax.flatten()[:3].tolist()}...)")
    groups = entry.get("groups", [])
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, (list, tuple)) and all(isinstance(n, str) for n in g) for g in groups):
        damaged("'qat.groups' is not a list of lists of quantizer names")


def _plain(x):
    """Paths and other objects -> plain types the safe loader accepts."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str, torch.Tensor)):
        return x
    return str(x)


def save_qat(path, model, settings=None, extra=None):
    """Write a QAT checkpoint atomically; `extra` entries go to the top level of the dict."""
    model = model.module if hasattr(model, "module") else model
    if not hasattr(model, "qat"):
        raise ValueError("save_qat: the model is not quantized (quantize_model first)")
    settings = settings or QuantSettings.from_dict(model.qat["settings"])
    fp32 = float_copy(model).cpu()
    for m in fp32.modules():  # hooks (distillation, DDP) hold closures that must not be pickled
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    for p in fp32.parameters():
        p.requires_grad_(False)
    strip_fused_forward(fp32)  # bound methods pickle as code (getattr): the model keeps their names instead
    extra = dict(extra or {})
    optimizer = extra.pop("optimizer", None)  # already plain (tensors, numbers, lists)
    ckpt = {"model": fp32,
            "qat": {"version": QAT_VERSION, "settings": settings.to_dict(),
                    "quantizer_state": quantizer_state(model), "disabled": disabled_quantizers(model),
                    "groups": [list(g) for g in model.qat["groups"]]},
            **_plain(extra), "optimizer": optimizer, "date": datetime.now().isoformat()}
    return save_atomic(ckpt, Path(path))


def load_qat(path, device="cpu", trusted=False):
    """-> (quantized model in eval mode on `device`, QuantSettings, raw checkpoint dict)."""
    ckpt = load_checkpoint(path, trusted=trusted)
    if not is_qat_checkpoint(ckpt):
        raise UserError(f"'{path}' is a plain checkpoint, not a QAT one (no 'qat' entry): "
                        f"make one with train_qat.py --weights {Path(path).name}")
    validate_qat_entry(ckpt, path)
    model = ckpt["model"].float().to(device)
    settings = QuantSettings.from_dict(ckpt["qat"]["settings"])
    quantize_model(model, settings)
    if [list(g) for g in model.qat["groups"]] != [list(g) for g in ckpt["qat"].get("groups", model.qat["groups"])]:
        raise UserError(f"'{path}': the quantizer groups rebuilt from the model differ from the ones saved "
                        f"(written by another version of qat/?)")
    try:
        load_quantizer_state(model, ckpt["qat"]["quantizer_state"])
        disable_quantizers(model, ckpt["qat"].get("disabled", []))  # older files: settings-disabled ones only
    except KeyError as e:
        raise UserError(f"'{path}': {e.args[0]}") from None
    return model.eval(), settings, ckpt
