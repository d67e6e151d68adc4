"""Empirical bias correction after calibration (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", section 4.2, empirical form): with BatchNorm fused into
the convolutions there is no BN to re-estimate, so the shift quantization adds to each output
channel's mean is removed through the convolution's bias instead.

For every quantized convolution, in forward order: bias += E[y_fp32] - E[y_quant] per output
channel (pre-activation outputs, mean over images and positions), where y_quant is measured with
every earlier convolution already corrected (the sequential form; correcting all layers from one
uncorrected pass would over-correct the later ones). One FP32 forward pass collects E[y_fp32] of
every convolution; one quantized forward pass corrects them all: a forward hook on each
convolution measures its output mean, adds the difference to its bias and returns the output
recomputed with it, so the layers after it already see the corrected values. Both passes see the same images,
as one batch (the sequential correction needs the statistics of all images at each layer before
the next layer runs).

NNCF's FastBiasCorrection / BiasCorrection do the same per-channel mean matching on OpenVINO /
ONNX graphs (BiasCorrection sequentially, sub-graph by sub-graph); they do not run on our torch
model with modelopt quantizers, hence this small version.
"""

import torch
import torch.nn as nn

from qat.calibrate import as_images
from qat.distributed import broadcast, is_main_rank
from qat.modules import QuantConv2d


def first_images(batches, n, device):
    """The first `n` images of `batches` (DataLoader batches or tensors) as one float 0-1 tensor."""
    out, have = [], 0
    for batch in batches:
        x = as_images(batch, device)
        out.append(x[:n - have])
        have += len(out[-1])
        if have >= n:
            break
    if not out:
        raise ValueError("bias correction: no images")
    return torch.cat(out)


def correctable_convs(qmodel, fp32):
    """[(name, quantized conv, its FP32 twin)] for every QuantConv2d with a bias; the FP32 model is
    the float model qmodel was quantized from (same module names)."""
    twins = dict(fp32.named_modules())
    out = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantConv2d) and m.bias is not None:
            twin = twins.get(name)
            if not isinstance(twin, nn.Conv2d) or twin.weight.shape != m.weight.shape:
                raise ValueError(f"bias correction: {name} has no matching convolution in the FP32 model")
            out.append((name, m, twin))
    return out


def _channel_mean(y):
    return y.detach().double().mean((0, 2, 3))


@torch.no_grad()
def correct_biases(qmodel, fp32, images):
    """Correct qmodel's convolution biases in place on `images` (float 0-1, one batch) ->
    [{'name', 'channels', 'mean_abs', 'max_abs'}] of the shifts applied, in forward order."""
    convs = correctable_convs(qmodel, fp32)
    fp32_mean, handles = {}, []

    def record(name):
        def hook(module, args, output):
            fp32_mean.setdefault(name, _channel_mean(output))
        return hook

    def correct(name):
        def hook(module, args, output):
            if name in shifts or name not in fp32_mean:  # once per conv; one the FP32 pass never ran: as is
                return None
            shift = fp32_mean[name] - _channel_mean(output)
            shifts[name] = shift
            module.bias.add_(shift.to(module.bias.dtype))
            # rerun with the new bias (this hook then passes) rather than output + shift: bit-identical
            # to every later forward, so the quantizers after it round exactly as they will from now on
            return module(*args)
        return hook

    shifts = {}
    q_training, f_training = qmodel.training, fp32.training
    try:
        handles = [twin.register_forward_hook(record(name)) for name, _, twin in convs]
        fp32.eval()(images)
        for h in handles:
            h.remove()
        handles = [m.register_forward_hook(correct(name)) for name, m, _ in convs]
        qmodel.eval()(images)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(q_training)
        fp32.train(f_training)
    return [{"name": name, "channels": len(s), "mean_abs": float(s.abs().mean()), "max_abs": float(s.abs().max())}
            for name, s in shifts.items()]


def bias_correction(qmodel, fp32, batches, n_images, device):
    """The pipeline's step: correct on the first `n_images` of `batches` (rank 0 under DDP, the
    biases then broadcast so every rank holds the same model) -> the per-layer summary."""
    summary, biases = None, None
    if is_main_rank():
        summary = correct_biases(qmodel, fp32, first_images(batches, n_images, device))
        biases = {row["name"]: dict(qmodel.named_modules())[row["name"]].bias.detach().cpu() for row in summary}
    summary, biases = broadcast((summary, biases))
    modules = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, b in biases.items():
            modules[name].bias.copy_(b.to(modules[name].bias.device))
    return summary
