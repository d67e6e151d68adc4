"""QAT checkpoints: an upstream-style dict that the safe loader accepts.

    {'model': fused FP32 DetectionModel (no quantizer modules pickled),
     'qat': {'version': 1, 'settings': QuantSettings as a dict,
             'quantizer_state': {quantizer name: amax tensor}, 'groups': [[names sharing one quantizer]]},
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
from qat.quantize import float_copy, load_quantizer_state, quantize_model, quantizer_state
from qat.settings import QuantSettings
from utils.safe_unpickle import strip_fused_forward

QAT_VERSION = 1


def is_qat_checkpoint(ckpt):
    """True for a dict written by save_qat (export uses this to pick the Q/DQ path)."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("qat"), dict) and "quantizer_state" in ckpt["qat"]


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
                    "quantizer_state": quantizer_state(model), "groups": [list(g) for g in model.qat["groups"]]},
            **_plain(extra), "optimizer": optimizer, "date": datetime.now().isoformat()}
    return save_atomic(ckpt, Path(path))


def load_qat(path, device="cpu", trusted=False):
    """-> (quantized model in eval mode on `device`, QuantSettings, raw checkpoint dict)."""
    ckpt = load_checkpoint(path, trusted=trusted)
    if not is_qat_checkpoint(ckpt):
        raise UserError(f"'{path}' is a plain checkpoint, not a QAT one (no 'qat' entry): "
                        f"make one with train_qat.py --weights {Path(path).name}")
    model = ckpt["model"].float().to(device)
    settings = QuantSettings.from_dict(ckpt["qat"]["settings"])
    quantize_model(model, settings)
    if [list(g) for g in model.qat["groups"]] != [list(g) for g in ckpt["qat"].get("groups", model.qat["groups"])]:
        raise UserError(f"'{path}': the quantizer groups rebuilt from the model differ from the ones saved "
                        f"(written by another version of qat/?)")
    try:
        load_quantizer_state(model, ckpt["qat"]["quantizer_state"])
    except KeyError as e:
        raise UserError(f"'{path}': {e.args[0]}") from None
    return model.eval(), settings, ckpt
