"""Learned activation ranges for QAT (LSQ, Esser et al. 2019, "Learned Step Size Quantization"):
every enabled activation quantizer's amax becomes a trainable parameter, initialised from
calibration. Weights keep their per-output-channel max (WeightQuantizer is never converted).

Ours, not modelopt's: modelopt 0.47 learns amax only for NVFP4 per-block weight scales
(`StaticBlockScaleQuantizer.enable_lsq`; its LSQConfig says "only NVFP4 per-block weight-scale
learning is supported"), and its INT8 TensorQuantizer keeps amax in a buffer that `_get_amax`
detaches (`.data`), so no gradient reaches it.

Forward (training, with grad): the grid of modelopt's per-tensor INT8 fake quantization,
x -> clamp(round(x * 127 / amax), -128, 127) * amax / 127, with a straight-through round (one
autograd.Function, `_LSQFakeQuant`: forward and backward in a few passes over the tensor). Its
gradient wrt the step s = amax / 127 is LSQ's: round(x/s) - x/s inside the range, -128 / 127 at
the clipped ends, times LSQ's gradient scale g = 1 / sqrt(numel(x) * 127). Without grad and in
ONNX export the quantizer is modelopt's own, reading the same amax (one value, so training,
evaluation, checkpoints and the exported Q/DQ scales agree).

The parameter is log(amax): amax stays positive by construction, and Adam's steps of
about lr become relative changes, which suits amaxes from 0.1 to 100 with one learning rate
(`--range-lr-mult` x the weights' lr). modelopt's `_amax` buffer is kept equal to exp(log_amax) on
every read (`amax`, `_get_amax`), so checkpoint (qat.quantize.quantizer_state) and export read it
unchanged.
"""
import math

import torch
import torch.nn as nn

from qat.modules import InputQuantizer, TensorQuantizer, WeightQuantizer
from qat.quantize import unique_quantizers


def _in_memory_order(t):
    """t's elements as a 1-D view in memory order (contiguous or channels_last: no copy)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


class _LSQFakeQuant(torch.autograd.Function):
    """modelopt's per-tensor INT8 fake quantization (same ops, same values) with LSQ's backward.

    Ours because the same thing as plain autograd ops (every op saves its inputs and runs its own backward)
    costs 3-6x this one's time per 8x64x80x80 forward + backward on one CPU thread, measured side by side
    (27 ms on a quiet machine), and torch's `_fake_quantize_learnable_per_tensor_affine` 53 ms (its kernel is
    slow on the CPU and it rounds x / s, not modelopt's x * (127 / amax)). With y = s * clamp(round(x / s)): dL/dx = g_y * inside and
    dL/d log(amax) = grad_scale * sum(g_y * (y - inside * x)) (LSQ's round(x/s) - x/s inside, -qn/qp or 1
    at the clipped ends, times amax for the log parameter): a mask and two dot products. When the
    tensor's min and max already land inside the grid (the usual case after calibration) nothing is
    clipped, so the clamp and the mask are skipped."""

    @staticmethod
    def forward(ctx, inputs, log_amax, qn, qp, grad_scale):
        x = inputs.float()
        scale = qp / log_amax.detach().exp().float()
        # the ends go through the same float32 ops as every element: nothing clipped <=> both land inside
        ends = (torch.stack(torch.aminmax(_in_memory_order(x))) * scale).round_()
        q = (x * scale).round_()
        inside = None
        if not (bool(ends[0] >= -qn) and bool(ends[1] <= qp)):  # some are clipped (or NaN)
            inside = (q >= -qn).logical_and_(q <= qp)
            q.clamp_(-qn, qp)
        y = q.div_(scale)
        ctx.save_for_backward(x, y, inside)
        ctx.grad_scale, ctx.input_dtype, ctx.log_amax_like = grad_scale, inputs.dtype, log_amax.detach()
        return y.to(inputs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, y, inside = ctx.saved_tensors
        g, x = (t if t.stride() == y.stride() else torch.empty_like(y).copy_(t)  # the dot products below
                for t in (grad_output.float(), x))                              # pair elements in memory order
        grad_x = g if inside is None else g * inside
        flat = _in_memory_order
        grad_log = torch.vdot(flat(g), flat(y)) - torch.vdot(flat(grad_x), flat(x))
        grad_log = (grad_log * ctx.grad_scale).to(ctx.log_amax_like.dtype).expand_as(ctx.log_amax_like)
        return grad_x.to(ctx.input_dtype), grad_log, None, None, None


class LearnedRangeQuantizer(InputQuantizer):
    """A per-tensor activation TensorQuantizer whose amax is the parameter exp(log_amax)."""

    def start_learning(self):
        """Create log_amax from the calibrated amax (called once, after the class swap)."""
        if self.axis is not None or self._unsigned or not isinstance(self._num_bits, int):
            raise ValueError("learned ranges: only per-tensor signed integer activation quantizers")
        amax = self._amax.detach().double().clamp_min(1e-12)
        # float32 like the weights: val.py's model.float() and Adam's state must not see another dtype
        self.log_amax = nn.Parameter(amax.log().float().to(self._amax.device))

    def learned_amax(self):
        """amax with its graph to log_amax."""
        return self.log_amax.exp()

    @torch.no_grad()
    def _sync(self):
        self._amax.copy_(self.log_amax.detach().exp().to(self._amax.dtype))

    @property
    def amax(self):
        if hasattr(self, "_amax") and "log_amax" in self._parameters:
            self._sync()
        return TensorQuantizer.amax.fget(self)

    @amax.setter
    def amax(self, value):  # e.g. load_quantizer_state: the parameter follows
        TensorQuantizer.amax.fset(self, value)
        if "log_amax" in self._parameters:
            with torch.no_grad():
                self.log_amax.copy_(self._amax.detach().double().clamp_min(1e-12).log())

    def _get_amax(self, inputs):
        if hasattr(self, "_amax") and "log_amax" in self._parameters:
            self._sync()
        return super()._get_amax(inputs)

    def _fake_quantize(self, inputs):
        if not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return super()._fake_quantize(inputs)
        self._sync()
        qp = 2.0 ** (self._num_bits - 1) - 1
        qn = qp if self._narrow_range else qp + 1
        return _LSQFakeQuant.apply(inputs, self.log_amax, qn, qp, 1.0 / math.sqrt(inputs.numel() * qp))


def learnable_quantizers(model):
    """The activation quantizers that can learn their range: enabled, calibrated, not weights."""
    return [q for _, q, _ in unique_quantizers(model)
            if not isinstance(q, WeightQuantizer) and q.is_enabled and q.amax is not None]


def enable_learned_ranges(model):
    """Make every learnable activation quantizer's amax a parameter (in place, shared quantizers
    stay shared) -> the list of log_amax parameters (for their own optimizer group)."""
    params = []
    for q in learnable_quantizers(model):
        if not isinstance(q, LearnedRangeQuantizer):
            q.__class__ = LearnedRangeQuantizer
            q.start_learning()
        params.append(q.log_amax)
    return params


def range_parameters(model):
    """The log_amax parameters of a model's learned-range quantizers (each once)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, LearnedRangeQuantizer) and id(m.log_amax) not in seen:
            seen.add(id(m.log_amax))
            out.append(m.log_amax)
    return out
