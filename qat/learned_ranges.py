"""Learned activation ranges for QAT (LSQ, Esser et al. 2019, "Learned Step Size Quantization"):
every enabled activation quantizer's amax becomes a trainable parameter, initialised from
calibration. Weights keep their per-output-channel max (WeightQuantizer is never converted).

Ours, not modelopt's: modelopt 0.47 learns amax only for NVFP4 per-block weight scales
(`StaticBlockScaleQuantizer.enable_lsq`; its LSQConfig says "only NVFP4 per-block weight-scale
learning is supported"), and its INT8 TensorQuantizer keeps amax in a buffer that `_get_amax`
detaches (`.data`), so no gradient reaches it.

Forward (training, with grad): the grid of modelopt's per-tensor INT8 fake quantization,
x -> clamp(round(x * 127 / amax), -128, 127) * amax / 127, with a straight-through round. Its
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

from qat.modules import TensorQuantizer, WeightQuantizer
from qat.quantize import unique_quantizers


def _round_ste(x):
    """round() forward, identity backward (straight-through)."""
    return (torch.round(x) - x).detach() + x


def _scale_grad(x, g):
    """x forward, gradient times g backward (LSQ's gradient scale)."""
    return (x - x * g).detach() + x * g


class LearnedRangeQuantizer(TensorQuantizer):
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
        # Written as plain torch ops on purpose: a hand-written autograd.Function for the same forward and
        # LSQ backward (and torch._fake_quantize_learnable_per_tensor_affine) measured slower on the CPU
        # (35 / 53 ms against 29 ms, 8x64x80x80 forward + backward); the builtin also rounds differently.
        if not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return super()._fake_quantize(inputs)
        self._sync()
        qp = 2.0 ** (self._num_bits - 1) - 1
        qn = qp if self._narrow_range else qp + 1
        amax = _scale_grad(self.learned_amax().float(), 1.0 / math.sqrt(inputs.numel() * qp))
        scale = qp / amax  # as modelopt's _tensor_quant: x * scale, rounded, clamped, / scale
        q = torch.clamp(_round_ste(inputs.float() * scale), -qn, qp)
        return (q / scale).to(inputs.dtype)


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
