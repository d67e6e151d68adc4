"""Calibration: collect activation ranges and set every quantizer's amax.

Weights: per-channel max of the weight itself (no data needed). Activations: 'max' keeps the
largest absolute value seen; 'percentile' / 'mse' / 'entropy' build a histogram of |x| (2048 bins,
qat.modules.RangeHistogram) and pick amax from it with the rules below; 'auto' collects the
histogram once and leaves the choice of rule to the caller (qat.pipeline: PTQ mAP on a selection
split), which `candidate_amaxes` / `load_amaxes` serve. A shared quantizer sees every tensor of its
group, so its one amax covers them all.

The rules are ours, not modelopt's: modelopt 0.47's mse calls fake_tensor_quant with its arguments
shifted (it returns the lowest candidate), and its entropy is a Python loop over bins (seconds per
quantizer). Here every rule is vectorised over all candidate amaxes at once (a few ms per quantizer).
All assume the product's grid: signed symmetric INT8 with 127 positive levels, x -> amax/127 *
clamp(round(127 x / amax), -128, 127), also for a non-negative tensor (TensorRT: zero point 0).

Multi-GPU (DDP): every rank calibrates on its shard of the batches, then the statistics are merged
so all ranks load the same amax: max -> all_reduce(MAX) of the running max; histograms -> a first
pass finds each quantizer's global max (all_reduce MAX), every rank then bins into the same edges
[0, global max], and the counts are summed (all_reduce SUM) before amax is computed. That is the
histogram one process would have built over all batches (with fixed instead of growing edges).

Over 300 lines: the histogram collector and the four rules computed from it are one piece (each
rule reads the collector's exact bins); splitting them would export its internals.
"""
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from qat.compat import atomic_output
from qat.distributed import is_distributed
from qat.modules import ACT_BITS, HISTOGRAM_METHODS, QuantConv2d, WeightQuantizer, calibrator_of
from qat.quantize import quantizer_summary, unique_quantizers
from qat.settings import QuantSettings

def as_images(batch, device):
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
            model(as_images(batch, device))
            seen += 1
    return seen


def activation_quantizers(model):
    return [q for _, q, _ in unique_quantizers(model) if not isinstance(q, WeightQuantizer) and q.is_enabled]


@torch.no_grad()
def calibrate_weights(model):
    """Per-output-channel amax = max |w| of each quantized convolution's current weight."""
    for m in model.modules():
        if isinstance(m, QuantConv2d) and m.weight_quantizer.is_enabled:
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
        calibrator_of(q).set_range(float(m), device)


def _merge_across_ranks(quantizers, histogram, device):
    """One all_reduce per quantizer on every rank, in the same order, before any amax is loaded.

    Not modelopt's max sync: `mtq.max_calibrate` syncs only modelopt-registered QuantModules (ours are
    not), and `TensorQuantizer.sync_amax_across_distributed_group` skips a quantizer with no amax on
    this rank (an empty shard -> ranks issue different all_reduces and hang) and turns a failed
    all_reduce into a warning (ranks keep different amax). The 'max' statistics themselves are
    modelopt's MaxCalibrator; the merged max goes back into its `_calib_amax` (private in 0.47, no
    setter; pinned in tests/qat/test_modelopt_contract.py) so `load_calib_amax()` loads it."""
    for q in quantizers:
        cal = calibrator_of(q)
        if histogram:
            dist.all_reduce(cal.hist, op=dist.ReduceOp.SUM)
            top = cal.running_max if cal.running_max is not None else torch.zeros((), device=device)
            top = top.to(device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            cal._calib_max = top  # RangeHistogram's own field (qat.modules)
        else:
            amax = cal.compute_amax()
            amax = (amax if amax is not None else torch.zeros((), device=device)).to(device)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
            cal._calib_amax = amax


# --------------------------------------------------------------------------------------------------
# amax rules on a histogram of |x|: `hist` (B counts), `edges` (B + 1 bin edges from 0)

PERCENTILES = (99.9, 99.99, 99.999)  # the percentile candidates of --calib-method auto


def _as64(hist, edges):
    return torch.as_tensor(hist).detach().double().cpu(), torch.as_tensor(edges).detach().double().cpu()


def amax_percentile(hist, edges, percentile):
    """The |x| below which `percentile` % of the data lies, interpolated linearly inside its bin."""
    hist, edges = _as64(hist, edges)
    cdf = torch.cat([hist.new_zeros(1), hist.cumsum(0)]) / hist.sum()
    target = min(float(percentile) / 100, 1.0)
    i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).clamp(1, len(cdf) - 1))
    lo, hi = cdf[i - 1], cdf[i]
    t = 0.0 if hi <= lo else float((target - lo) / (hi - lo))
    return float(edges[i - 1] + t * (edges[i] - edges[i - 1]))


def _rounding_integral(x, step):
    """integral_0^x (t - step * round(t / step))^2 dt for x >= 0 (elementwise, closed form)."""
    u = x / step + 0.5
    k = torch.floor(u)
    f = u - k
    return step ** 3 * (k / 12 + ((f - 0.5) ** 3 + 0.125) / 3 - 1 / 24)


def quantization_mse(hist, edges, amaxes, num_bits=ACT_BITS):
    """Expected squared error of quantizing the histogram's data with each amax in `amaxes`, data
    uniform inside each bin (exact under that assumption: closed-form integrals, no sampling)."""
    hist, edges = _as64(hist, edges)
    amaxes = torch.as_tensor(amaxes, dtype=torch.float64).reshape(-1, 1)
    density = (hist / (edges[1:] - edges[:-1]).clamp_min(1e-300)).reshape(1, -1)
    step = amaxes / (2 ** (num_bits - 1) - 1)
    x = edges.reshape(1, -1)
    inside = _rounding_integral(torch.minimum(x, amaxes), step)  # rounding error below amax
    clipped = (x - amaxes).clamp_min(0) ** 3 / 3  # values above amax land on amax
    err = ((inside[:, 1:] - inside[:, :-1]) + (clipped[:, 1:] - clipped[:, :-1])) * density
    return err.sum(1) / hist.sum()


def amax_mse(hist, edges, num_bits=ACT_BITS, strides=(32, 4, 1)):
    """The bin edge that minimises `quantization_mse`, searched coarse to fine: every 32nd edge,
    then every 4th and every edge around the best so far (the error is continuous in amax; ~90
    evaluations instead of 2048)."""
    hist, edges = _as64(hist, edges)
    candidates = edges[1:]
    n = len(candidates)
    lo, hi, best = 0, n - 1, n - 1
    for stride in strides:
        idx = torch.cat([torch.arange(lo, hi + 1, stride), torch.tensor([hi, best])]).unique()
        best = int(idx[int(torch.argmin(quantization_mse(hist, edges, candidates[idx], num_bits)))])
        lo, hi = max(best - stride, 0), min(best + stride, n - 1)
    return float(candidates[best])


def kl_divergences(hist, stops, num_bits=ACT_BITS):
    """TensorRT's entropy calibration (the rule modelopt's `_compute_amax_entropy` loops over bin by
    bin), for every candidate stop bin i at once: P = hist[:i] with everything beyond added to its
    last bin; Q = hist[:i] merged into 2^(bits-1) groups of bins and spread evenly back over each
    group's non-empty bins; returns KL(P || Q) per stop (inf where P has mass that Q lacks). Group
    sums come from prefix sums, so one stop costs O(levels), not O(bins)."""
    h = torch.as_tensor(hist).detach().double().cpu().clone()
    h[0] = h[1]  # as TensorRT / modelopt: the spike of zeros (ReLU) does not decide the range
    total = h.sum()
    zero = torch.zeros(1, dtype=h.dtype)
    hlogh = torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), torch.zeros((), dtype=h.dtype))
    S, N, L = (torch.cat([zero, v.cumsum(0)]) for v in (h, (h > 0).double(), hlogh))
    stops = torch.as_tensor(stops, dtype=torch.int64).reshape(-1, 1)
    levels = 1 << (num_bits - 1)
    k = torch.arange(levels + 1).reshape(1, -1)
    bounds = (k * stops + levels - 1) // levels  # group g holds bins [bounds[g], bounds[g + 1])
    H = S[bounds[:, 1:]] - S[bounds[:, :-1]]
    M = N[bounds[:, 1:]] - N[bounds[:, :-1]]
    Lg = L[bounds[:, 1:]] - L[bounds[:, :-1]]
    s_i = S[stops]  # Q's total mass (every bin of hist[:i] is kept)
    log_q = torch.log(H.clamp_min(1e-300)) - torch.log(M.clamp_min(1)) - torch.log(s_i)
    filled = H > 0
    kl = torch.where(filled, Lg - H * torch.log(total) - H * log_q, torch.zeros((), dtype=h.dtype)).sum(1) / total
    # the last bin of P also holds the tail beyond the stop: swap its term for the corrected one
    last = (stops - 1).reshape(-1)
    h_last, tail = h[last], total - s_i.reshape(-1)
    g_last = ((last * levels) // stops.reshape(-1)).reshape(-1, 1)
    log_q_last = log_q.gather(1, g_last).reshape(-1)
    p_old, p_new = h_last / total, (h_last + tail) / total
    nought, inf = torch.zeros((), dtype=h.dtype), torch.full((), float("inf"), dtype=h.dtype)
    old = torch.where(h_last > 0, p_old * (torch.log(p_old.clamp_min(1e-300)) - log_q_last), nought)
    new = torch.where(h_last > 0, p_new * (torch.log(p_new.clamp_min(1e-300)) - log_q_last),
                      torch.where(p_new > 0, inf, nought))
    return kl - old + new


def amax_entropy(hist, edges, num_bits=ACT_BITS, start_bin=128):
    """Left edge of the stop bin with the smallest KL divergence (the largest stop on ties), stops
    start_bin..bins as in TensorRT / modelopt (fewer bins than levels would be meaningless)."""
    hist, edges = _as64(hist, edges)
    start = min(start_bin, len(hist))
    stops = torch.arange(start, len(hist) + 1)
    kl = kl_divergences(hist, stops, num_bits)
    best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))
    return float(edges[int(stops[best])])


def histogram_amax(cal, method, percentile=99.99):
    """amax of one RangeHistogram by `method` ('max', 'percentile', 'mse', 'entropy'); never above
    the largest |x| seen (the top bin edge can lie beyond it)."""
    top = float(cal.running_max)
    hist, edges = cal.hist, cal.bin_edges
    if method == "max":
        return top
    if method == "percentile":
        return min(amax_percentile(hist, edges, percentile), top)
    if method == "mse":
        return min(amax_mse(hist, edges, cal.num_bits), top)
    if method == "entropy":
        return min(amax_entropy(hist, edges, cal.num_bits), top)
    raise ValueError(f"unknown calibration rule {method}")


def candidate_name(method, percentile=None):
    return f"percentile {percentile:g}" if method == "percentile" else method


def auto_candidates(percentiles=PERCENTILES):
    """(name, method, percentile) of every rule --calib-method auto compares."""
    rows = [("max", "max", None)]
    rows += [(candidate_name("percentile", p), "percentile", p) for p in percentiles]
    return rows + [("mse", "mse", None), ("entropy", "entropy", None)]


def candidate_amaxes(model, candidates=None):
    """{candidate name: {quantizer name: amax}} from the histograms `calibrate(..., keep_histograms=True)`
    left in the activation quantizers."""
    candidates = candidates or auto_candidates()
    quantizers = [(name, q) for name, q, _ in unique_quantizers(model)
                  if not isinstance(q, WeightQuantizer) and q.is_enabled]
    out = {}
    for label, method, pct in candidates:
        out[label] = {name: histogram_amax(calibrator_of(q), method, pct) for name, q in quantizers}
    return out


def load_amaxes(model, amaxes):
    """Set activation amax values from `candidate_amaxes(...)[name]`."""
    device = next(model.parameters()).device
    for name, q, _ in unique_quantizers(model):
        if name in amaxes:
            q.amax = torch.tensor(float(amaxes[name]), device=device)


def free_histograms(model):
    for q in activation_quantizers(model):
        calibrator_of(q).reset()


# --------------------------------------------------------------------------------------------------

def calibrate(model, batches, settings=None, device=None, max_batches=None, show=True, keep_histograms=False):
    """Calibrate a quantized model in place and return `quantizer_summary(model)`.

    batches: iterable of float image tensors 0-1 (or DataLoader batches: uint8 images are scaled);
    at most `max_batches` of them are used (per rank under DDP: pass each rank its own shard).
    'auto' (or keep_histograms) keeps the histograms for `candidate_amaxes`; amax is then set by
    'max' until the caller loads another candidate (then `free_histograms`)."""
    settings = settings or QuantSettings.from_dict(getattr(model, "qat", {}).get("settings"))
    device = device or next(model.parameters()).device
    method = settings.calib_method
    histogram = method in HISTOGRAM_METHODS
    keep = keep_histograms or method == "auto"
    n = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    training = model.training
    model.eval()
    calibrate_weights(model)
    weights = [q for _, q, _ in unique_quantizers(model) if isinstance(q, WeightQuantizer) and q.is_enabled]
    for q in weights:  # statistics are collected on the FP32 network, as modelopt does
        q.disable_quant()
    quantizers = activation_quantizers(model)
    for q in quantizers:
        q.reset_amax()
        calibrator_of(q).reset()
        q.disable_quant()
        q.enable_calib()
    try:
        if histogram and is_distributed():
            for q in quantizers:
                q.disable_calib()
            _fixed_histogram_edges(model, quantizers, batches, device, n, show)
            for q in quantizers:
                q.enable_calib()
        seen = _run(model, batches, device, n, f"calibrate ({method})", show)
        if seen == 0 and not is_distributed():
            raise ValueError("calibrate: no batches to calibrate on")
        if is_distributed():
            _merge_across_ranks(quantizers, histogram, device)
        for q in quantizers:
            q.disable_calib()
            cal = calibrator_of(q)
            empty = cal.hist is None if histogram else cal.compute_amax() is None
            if empty or (histogram and float(cal.hist.sum()) == 0):
                warnings.warn("a quantizer saw no data during calibration; it stays disabled")
                q.disable()
                continue
            if histogram:
                rule = "max" if method == "auto" else method
                q.amax = torch.tensor(histogram_amax(cal, rule, settings.percentile), device=device)
            else:
                q.load_calib_amax()
            q.enable_quant()
            if not keep:
                cal.reset()  # the histograms are large; amax is what is kept
    finally:
        for q in weights:
            q.enable_quant()
        model.train(training)
    model.to(device)
    return quantizer_summary(model)


def _fmt(x):
    return "" if x is None else f"{x:.6g}"


def write_summary(summary, save_dir, name="calibration"):
    """Per-quantizer amax table: `<name>.md` (activations, then weights condensed) and `<name>.json`."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(save_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
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
    with atomic_output(save_dir / f"{name}.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return save_dir / f"{name}.md"
