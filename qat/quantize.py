"""Insert Q/DQ quantizers into a fused FP32 YOLOv9 model and make each group share one quantizer.

    model = attempt_load("best.pt")                       # fused FP32
    qmodel = quantize_model(model, QuantSettings())       # in place; returns the model
    calibrate(qmodel, batches, settings)                  # qat.calibrate

Steps: (1) every module whose class has a quantized subclass (qat.modules.QUANT_CLASSES) becomes
that subclass, each quantization point with its own quantizer; the DFL's fixed 1x1 convolution
(the box-decoding integral, no speed to gain) stays float. (2) `qat.rules` traces which points
read tensors that must share a scale. (3) the points of a group get ONE quantizer object; points
of skipped modules (`--skip-layers`, `--no-last-layer`) get a disabled quantizer of their own, so
skipping one layer never un-quantizes its neighbours.
"""
from copy import deepcopy

import torch

from models.common import DFL
from qat.modules import (QUANT_CLASSES, QuantConv2d, QuantMixin, WeightQuantizer, disabled_quantizer, is_quantizer,
                         to_float, to_quant)
from qat.rules import quantizer_slots, trace_groups
from qat.settings import QuantSettings


def is_quantized(model):
    return any(is_quantizer(m) for m in model.modules())


def _fixed_convs(model):
    """ids of convolutions that are never quantized: the DFL's constant arange kernel."""
    return {id(m.conv) for m in model.modules() if isinstance(m, DFL)}


def head_prefix(model):
    return f"model.{len(model.model) - 1}."


def disable_slots(model, prefixes):
    """Give every quantization point whose slot name starts with one of `prefixes` a disabled
    quantizer of its own (a quantizer it shares with other layers stays active there). Returns
    [(parent, attr, previous quantizer)] so a caller can put them back."""
    from qat.rules import quantizer_slots

    prefixes = tuple(prefixes)
    slots = [(parent, attr, q) for name, parent, attr, q in quantizer_slots(model) if name.startswith(prefixes)]
    for parent, attr, _ in slots:
        setattr(parent, attr, disabled_quantizer())
    return slots


def slot_skipped(name, model, settings):
    return (settings.no_last_layer and name.startswith(head_prefix(model))) or settings.skips(name)


def quantize_model(model, settings=None, example=None):
    """Quantize a fused FP32 DetectionModel in place (fuses it first if needed) and return it.

    The model gets `model.qat = {'settings': dict, 'groups': [[slot names]]}` (groups with more
    than one member)."""
    settings = settings or QuantSettings()
    if is_quantized(model):
        raise ValueError("quantize_model: the model is already quantized")
    if hasattr(model, "is_fused") and not model.is_fused():
        model.fuse()
    fixed = _fixed_convs(model)
    for m in list(model.modules()):
        if type(m) in QUANT_CLASSES and id(m) not in fixed:
            to_quant(m, settings)

    groups = trace_groups(model, example)
    where = {name: (parent, attr) for name, parent, attr, _ in quantizer_slots(model)}
    shared = []
    for group in groups:
        active = [s for s in group if not slot_skipped(s, model, settings)]
        for s in group:
            if s not in active:
                setattr(*where[s], disabled_quantizer())
        if active:
            q = getattr(*where[active[0]])
            for s in active[1:]:
                setattr(*where[s], q)
            if len(active) > 1:
                shared.append(active)
    for name, (parent, attr) in where.items():
        if attr == "weight_quantizer" and slot_skipped(name, model, settings):
            parent.weight_quantizer.disable()
    model.qat = {"settings": settings.to_dict(), "groups": shared}
    return model


def unique_quantizers(model):
    """[(canonical name, quantizer, [slot names])]: each quantizer object once, named by its first slot."""
    out, index = [], {}
    for name, _, _, q in quantizer_slots(model):
        if id(q) in index:
            out[index[id(q)]][2].append(name)
        else:
            index[id(q)] = len(out)
            out.append((name, q, [name]))
    return out


def _amax_stats(q):
    a = q.amax
    if a is None:
        return None, None
    a = a.detach().float().flatten().cpu()
    return (float(a.item()), None) if a.numel() == 1 else (float(a.max()), float(a.min()))


def quantizer_summary(model):
    """One dict per quantizer object: name, members, kind (input|weight), bits, per (tensor|channel),
    enabled, amax (per-channel: the largest) and amax_min (per-channel), group (index or None)."""
    groups = {g[0]: i for i, g in enumerate(getattr(model, "qat", {}).get("groups", []))}
    rows = []
    for name, q, members in unique_quantizers(model):
        amax, amax_min = _amax_stats(q)
        rows.append({"name": name, "members": members, "kind": "weight" if isinstance(q, WeightQuantizer) else "input",
                     "bits": int(q.num_bits), "per": "tensor" if q.axis is None else "channel",
                     "enabled": q.is_enabled, "amax": amax, "amax_min": amax_min, "group": groups.get(name)})
    return rows


def prepare_for_training(model):
    """Fused (upstream-style) parameters may come frozen: make every trainable parameter require
    grad again; the DFL's constant kernel stays frozen."""
    fixed = _fixed_convs(model)
    for m in model.modules():
        if id(m) in fixed:
            continue
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    return model


@torch.no_grad()
def clamp_weights_to_range(model):
    """Clip each quantized weight to its calibrated range: the fake-quant output does not change
    (quantization clips there anyway), but the stored float weights then export with |q| within
    the weight bits even through a converter that ignores our export path."""
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.weight_quantizer.is_enabled and m.weight_quantizer.amax is not None:
            a = m.weight_quantizer.amax.to(m.weight.dtype)
            m.weight.copy_(torch.maximum(torch.minimum(m.weight, a), -a))
    return model


def float_copy(model):
    """A plain FP32 copy of a quantized model (no quantizer modules, original classes), weights
    clipped to their calibrated ranges: what a QAT checkpoint pickles."""
    m = deepcopy(model)
    clamp_weights_to_range(m)
    for module in list(m.modules()):
        if isinstance(module, QuantMixin):
            to_float(module)
    if hasattr(m, "qat"):
        del m.qat
    return m


def quantizer_state(model):
    """{canonical name: amax tensor} for every calibrated quantizer."""
    return {name: q.amax.detach().cpu().clone() for name, q, _ in unique_quantizers(model) if q.amax is not None}


def load_quantizer_state(model, state):
    """Set amax from `quantizer_state` output; a name the model does not have is an error."""
    by_name = {name: q for name, q, _ in unique_quantizers(model)}
    missing = [k for k in state if k not in by_name]
    if missing:
        raise KeyError(f"quantizer '{missing[0]}' of the checkpoint is not in the model ({len(missing)} missing)")
    for k, v in state.items():
        by_name[k].amax = v.to(next(model.parameters()).device)
    return model


def disabled_quantizers(model):
    """Canonical names of the quantizers that are disabled (by settings, or by calibration when one
    saw no data): saved beside the amax so that a reloaded model quantizes exactly the same points."""
    return [name for name, q, _ in unique_quantizers(model) if not q.is_enabled]


def disable_quantizers(model, names):
    """Disable the quantizers `names` (from `disabled_quantizers`); a name the model lacks is an error."""
    by_name = {name: q for name, q, _ in unique_quantizers(model)}
    missing = [k for k in names if k not in by_name]
    if missing:
        raise KeyError(f"quantizer '{missing[0]}' of the checkpoint is not in the model ({len(missing)} missing)")
    for k in names:
        by_name[k].disable()
    return model


def uncalibrated_quantizers(model):
    """Names of enabled quantizers without an amax: they would quantize with a per-batch range."""
    return [name for name, q, _ in unique_quantizers(model) if q.is_enabled and q.amax is None]


def set_quant_enabled(model, enabled=True):
    """Turn fake quantization on/off for every enabled-by-settings quantizer (e.g. to compare)."""
    for _, q, _ in unique_quantizers(model):
        if enabled:
            q.enable_quant()
        else:
            q.disable_quant()
    return model


__all__ = ["quantize_model", "quantizer_summary", "unique_quantizers", "prepare_for_training", "float_copy",
           "quantizer_state", "load_quantizer_state", "disabled_quantizers", "disable_quantizers",
           "uncalibrated_quantizers", "is_quantized", "QuantSettings"]
