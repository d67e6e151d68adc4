"""Calibration: collect activation ranges and set every quantizer's amax.

Weights: per-channel max of the weight itself (no data needed). Activations: 'max' keeps the
largest absolute value seen; 'percentile' / 'mse' / 'entropy' build modelopt's histogram and pick
amax from it. A shared quantizer sees every tensor of its group, so its one amax covers them all.

Multi-GPU (DDP): every rank calibrates on its shard of the batches, then the statistics are merged
so all ranks load the same amax: max -> all_reduce(MAX) of the running max; histograms -> a first
pass finds each quantizer's global max (all_reduce MAX), every rank then bins into the same edges
[0, global max], and the counts are summed (all_reduce SUM) before amax is computed. That is the
histogram one process would have built over all batches (with fixed instead of growing edges).
"""
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qat.modules import HISTOGRAM_METHODS, QuantConv2d, WeightQuantizer
from qat.quantize import quantizer_summary, unique_quantizers
from qat.settings import QuantSettings

NUM_BINS = 2048


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _as_images(batch, device):
    """A batch from a DataLoader (imgs, targets, ...) or a tensor -> float 0-1 images on device."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    x = x.to(device, non_blocking=True)
    return x.float() / 255 if not x.is_floating_point() else x.float()


def _run(model, batches, device, n, desc, show):
    bar = tqdm(batches, total=n, desc=desc, disable=not show, bar_format="{l_bar}{bar:10}{r_bar}")
    seen = 0
    with torch.no_grad():
        for i, batch in enumerate(bar):
            if n is not None and i >= n:
                break
            model(_as_images(batch, device))
            seen += 1
    return seen


def activation_quantizers(model):
    return [q for _, q, _ in unique_quantizers(model) if not isinstance(q, WeightQuantizer) and not q._disabled]


@torch.no_grad()
def calibrate_weights(model):
    """Per-output-channel amax = max |w| of each quantized convolution's current weight."""
    for m in model.modules():
        if isinstance(m, QuantConv2d) and not m.weight_quantizer._disabled:
            q = m.weight_quantizer
            q.reset_amax()
            q.disable_quant()
            q.enable_calib()
            q(m.weight)
            q.load_calib_amax()
            q.enable_quant()
            q.disable_calib()


def _fixed_histogram_edges(model, quantizers, batches, device, n, show):
    """DDP histogram calibration, pass 1: each quantizer's global |max|, then fixed bin edges."""
    maxima = {id(q): torch.zeros((), device=device) for q in quantizers}

    def hook(module, args):
        maxima[id(module)] = torch.maximum(maxima[id(module)], args[0].detach().abs().max().float())

    handles = [q.register_forward_pre_hook(hook) for q in quantizers]
    try:
        _run(model, batches, device, n, "calibration range", show)
    finally:
        for h in handles:
            h.remove()
    for q in quantizers:
        m = maxima[id(q)]
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        cal = q._calibrator
        cal._calib_bin_edges = torch.linspace(0, float(m), NUM_BINS + 1, device=device)
        cal._calib_hist = torch.zeros(NUM_BINS, device=device)
        cal._num_bins = NUM_BINS


def _merge_across_ranks(quantizers, histogram, device):
    for q in quantizers:
        cal = q._calibrator
        if histogram:
            dist.all_reduce(cal._calib_hist, op=dist.ReduceOp.SUM)
        else:
            amax = cal._calib_amax if cal._calib_amax is not None else torch.zeros((), device=device)
            amax = amax.to(device)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
            cal._calib_amax = amax


def calibrate(model, batches, settings=None, device=None, max_batches=None, show=True):
    """Calibrate a quantized model in place and return `quantizer_summary(model)`.

    batches: iterable of float image tensors 0-1 (or DataLoader batches: uint8 images are scaled);
    at most `max_batches` of them are used (per rank under DDP: pass each rank its own shard)."""
    settings = settings or QuantSettings.from_dict(getattr(model, "qat", {}).get("settings"))
    device = device or next(model.parameters()).device
    histogram = settings.calib_method in HISTOGRAM_METHODS
    n = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    training = model.training
    model.eval()
    calibrate_weights(model)
    weights = [q for _, q, _ in unique_quantizers(model) if isinstance(q, WeightQuantizer) and not q._disabled]
    for q in weights:  # statistics are collected on the FP32 network, as modelopt does
        q.disable_quant()
    quantizers = activation_quantizers(model)
    for q in quantizers:
        q.reset_amax()
        q.disable_quant()
        q.enable_calib()
    try:
        if histogram and _distributed():
            for q in quantizers:
                q.disable_calib()
            _fixed_histogram_edges(model, quantizers, batches, device, n, show)
            for q in quantizers:
                q.enable_calib()
        seen = _run(model, batches, device, n, f"calibrate ({settings.calib_method})", show)
        if seen == 0 and not _distributed():
            raise ValueError("calibrate: no batches to calibrate on")
        if _distributed():
            _merge_across_ranks(quantizers, histogram, device)
        for q in quantizers:
            q.disable_calib()
            cal = q._calibrator
            empty = cal._calib_hist is None if histogram else cal._calib_amax is None
            if empty or (histogram and float(cal._calib_hist.sum()) == 0):
                warnings.warn("a quantizer saw no data during calibration; it stays disabled")
                q.disable()
                continue
            with warnings.catch_warnings():  # modelopt warns that histograms are not synced: we did that
                warnings.simplefilter("ignore")
                if settings.calib_method == "percentile":
                    q.load_calib_amax("percentile", percentile=settings.percentile)
                elif histogram:
                    q.load_calib_amax(settings.calib_method)
                else:
                    q.load_calib_amax()
            q.enable_quant()
            q._calibrator.reset()  # the histograms are large; amax is what is kept
    finally:
        for q in weights:
            q.enable_quant()
        model.train(training)
    model.to(device)  # histogram amax comes back on the CPU
    return quantizer_summary(model)


def _fmt(x):
    return "" if x is None else f"{x:.6g}"


def write_summary(summary, save_dir, name="calibration"):
    """Per-quantizer amax table: `<name>.md` (activations, then weights condensed) and `<name>.json`."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / f"{name}.json").write_text(json.dumps(summary, indent=1))
    acts = [r for r in summary if r["kind"] == "input"]
    weights = [r for r in summary if r["kind"] == "weight"]
    lines = ["# Calibration: activation quantizers", "",
             f"{len(acts)} activation quantizers ({sum(r['enabled'] for r in acts)} enabled), "
             f"{sum(len(r['members']) for r in acts)} quantization points, {len(weights)} weight quantizers.", "",
             "| quantizer | points sharing it | bits | enabled | amax |", "|---|---|---|---|---|"]
    for r in acts:
        lines.append(f"| {r['name']} | {len(r['members'])} | {r['bits']} | {'yes' if r['enabled'] else 'no'} "
                     f"| {_fmt(r['amax'])} |")
    lines += ["", "# Weight quantizers (per output channel)", "",
              "| quantizer | bits | enabled | amax min | amax max |", "|---|---|---|---|---|"]
    for r in weights:
        lines.append(f"| {r['name']} | {r['bits']} | {'yes' if r['enabled'] else 'no'} | {_fmt(r['amax_min'])} "
                     f"| {_fmt(r['amax'])} |")
    (save_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return save_dir / f"{name}.md"
