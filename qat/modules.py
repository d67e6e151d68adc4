"""Quantized versions of the YOLOv9 modules, and the quantizers themselves (modelopt underneath).

Each quantized class subclasses its float class and adds modelopt `TensorQuantizer`s at the points
where TensorRT sees a Q/DQ pair: Conv2d input (per-tensor) and weight (per-output-channel), the
inputs of Concat / residual Add / MaxPool / Upsample / CBFuse. `quantize.py` turns a float
instance into its quantized subclass in place (`to_quant`) and back (`to_float`), so a model is
never changed for every instance of a class. Which quantizers share one object is decided by
`rules.py`; here every point starts with its own quantizer.

modelopt is imported here and in `calibrate.py` only; nothing outside qat/ touches its API.

Over 300 lines: the quantizers (weight quantizer, histogram calibrator) and the dozen quantized
block classes are one contract (the blocks hold exactly these quantizers), each class a few lines.
"""
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import ADown, CBFuse, Concat, ELAN1, RepNBottleneck, RepNCSP, RepNCSPELAN4, SPPELAN

with warnings.catch_warnings():  # modelopt's import warns about a missing CUDA runtime and jit.script
    warnings.simplefilter("ignore")
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

ACT_BITS = 8  # TensorRT / OpenVINO: activations are per-tensor symmetric INT8, zero point 0
HISTOGRAM_METHODS = ("percentile", "mse", "entropy", "auto")  # auto: all candidates from one histogram
NUM_BINS = 2048


class WeightQuantizer(TensorQuantizer):
    """Per-output-channel (axis 0) symmetric weight quantizer, narrow range [-(2^(b-1)-1), 2^(b-1)-1].

    With `num_bits=7` (DESIGN.md section 5: CPUs without VNNI saturate 8-bit weights) the fake
    quantization in training is modelopt's own 7-bit one. Engines only take INT8 Q/DQ, so during
    ONNX export the same grid is written as INT8 with scale amax/63 (|q| <= 63), weights clamped to
    the calibrated range first so no value can land outside it; for 8 bits the clamp keeps |q| <= 127.
    The forward values are identical either way."""

    # Private modelopt 0.47 names used here (pinned in tests/qat/test_modelopt_contract.py):
    # `_fake_quantize` is the one step forward() delegates the fake quantization to; modelopt has no
    # public hook to change the grid written at export, so it is overridden. `_get_amax(inputs)` is
    # the amax the parent's `_fake_quantize` uses (the `amax` property is the raw buffer, without the
    # device alignment and export-mode detach), so both paths see the same tensor. `_pass_through_bwd`
    # has no public getter (only the config field).
    def _fake_quantize(self, inputs):
        if not torch.onnx.is_in_onnx_export():
            return super()._fake_quantize(inputs)
        amax = self._get_amax(inputs)
        if bool((inputs.abs() > amax).any()):  # only emitted when weights left the calibrated range
            inputs = torch.maximum(torch.minimum(inputs, amax), -amax)
        amax8 = amax * ((2 ** (ACT_BITS - 1) - 1) / (2 ** (self.num_bits - 1) - 1))
        return fake_tensor_quant(inputs, amax8, None, ACT_BITS, False, False, self.trt_high_precision_dtype,
                                 self._pass_through_bwd, None, None)


_once = None  # while quantize_once() is active: {(id(quantizer), id(tensor)): (tensor, versions, output)}


@contextmanager
def quantize_once():
    """Within one forward pass, an activation quantizer that meets a tensor it has already quantized
    returns its first output instead of quantizing it again. One tensor often feeds two quantization
    points that rules.py made one shared quantizer (gelan-t: 80 of 346 activation quantizer calls per
    forward); a QAT step spends ~a third of its time in them. The same output to both consumers gives
    the same gradients (the quantizers' backward is linear in the incoming gradient). Scoped to one
    forward (qat.finetune's step): the cache holds the tensors, and amax may change between forwards."""
    global _once
    outer, _once = _once, {}
    try:
        yield
    finally:
        _once = outer


class InputQuantizer(TensorQuantizer):
    """modelopt's per-tensor activation TensorQuantizer, keeping the tensor's memory layout.

    modelopt 0.47's `forward` makes every non-contiguous input contiguous first (for its FP4 kernels),
    which turns a channels_last activation (QAT trains in channels_last, qat.finetune) into NCHW, and the
    next convolution turns it back: two copies per quantizer. A per-tensor integer fake quantization is
    elementwise, so the layout does not matter: when that is all the forward would do, it goes straight
    to `_fake_quantize` (the step modelopt's forward delegates to); calibration, ONNX export and anything
    else stay modelopt's forward. Private names read (pinned in tests/qat/test_modelopt_contract.py):
    `_if_quant`, `_if_calib`, `_disabled`, `_fake_quant`."""

    def forward(self, inputs):
        if (type(inputs) is torch.Tensor and inputs.numel() and self._if_quant and not self._if_calib
                and not self._disabled and self._fake_quant and self.pre_quant_scale is None
                and self.block_sizes is None and not self.rotate_is_enabled
                and not torch.onnx.is_in_onnx_export()):
            if _once is None:
                return self._fake_quantize(inputs)
            hit = _once.get((id(self), id(inputs)))  # ids stay unique: the cache holds the tensors
            if hit is not None and hit[0] is inputs and hit[1] == (inputs._version, hit[2]._version):
                return hit[2]
            out = self._fake_quantize(inputs)
            _once[(id(self), id(inputs))] = (inputs, (inputs._version, out._version), out)
            return out
        return super().forward(inputs)


class RangeHistogram(HistogramCalibrator):
    """modelopt's HistogramCalibrator with a collection that stays exact when later batches are larger.

    modelopt 0.47 grows its edges with `torch.arange` and re-bins with `histc` over a range whose
    width no longer matches the old bins, so earlier counts land in the wrong bins; and its
    `compute_amax('mse')` passes its arguments to `fake_tensor_quant` in the wrong order (it returns
    the lowest candidate, amax 0.0627 for data uniform on [0, 1]). Here: always NUM_BINS bins over
    [0, range] of |x|; when a batch exceeds the range, the range doubles (as many times as needed)
    and adjacent bins are merged pairwise, which is exact. The exact running max |x| is kept too
    (`_calib_max`: the 'max' candidate of `--calib-method auto`). amax rules: qat.calibrate.

    The counts and edges stay in HistogramCalibrator's own `_calib_hist` / `_calib_bin_edges` (private
    in modelopt 0.47) so its `reset()` frees them; `_num_bits` is the calibrator's (TensorQuantizer's
    `num_bits` setter writes it; the calibrator has no public getter). Read them through the public
    properties below; tests/qat/test_modelopt_contract.py pins the private names."""

    def __init__(self, num_bits=8, axis=None, unsigned=False):
        super().__init__(num_bits, axis, unsigned, num_bins=NUM_BINS, torch_hist=True)
        self._calib_max = None
        self._calib_range = None

    def reset(self):
        super().reset()
        self._calib_max = None
        self._calib_range = None

    def set_range(self, top, device):
        """Fixed bins over [0, top] (DDP: every rank bins into the same edges)."""
        self._calib_range = max(float(top), 1e-30)
        self._calib_hist = torch.zeros(NUM_BINS, dtype=torch.float64, device=device)  # exact counts
        self._calib_bin_edges = torch.linspace(0, self._calib_range, NUM_BINS + 1, device=device)

    @torch.no_grad()
    def collect(self, x):
        if x.numel() == 0:
            return
        x = x.detach().float().abs()
        top = x.max()
        self._calib_max = top if self._calib_max is None else torch.maximum(self._calib_max, top)
        top = float(top)
        if self._calib_hist is None:
            self.set_range(top, x.device)
        elif top > self._calib_range:
            doublings = math.ceil(math.log2(top / self._calib_range))
            factor = 2 ** doublings
            hist = self._calib_hist
            if factor >= NUM_BINS:
                merged = hist.sum().reshape(1)
            else:
                merged = hist.view(NUM_BINS // factor, factor).sum(1)
            self._calib_hist = torch.cat([merged, hist.new_zeros(NUM_BINS - merged.numel())])
            self._calib_range *= factor
            self._calib_bin_edges = torch.linspace(0, self._calib_range, NUM_BINS + 1, device=x.device)
        self._calib_hist += torch.histc(x, bins=NUM_BINS, min=0, max=self._calib_range)

    @property
    def hist(self):
        """Counts of |x| per bin (float64, NUM_BINS), or None before the first batch / after reset."""
        return self._calib_hist

    @property
    def bin_edges(self):
        """NUM_BINS + 1 edges from 0, or None."""
        return self._calib_bin_edges

    @property
    def running_max(self):
        """The exact largest |x| seen (0-d tensor), or None."""
        return self._calib_max

    @property
    def num_bits(self):
        return self._num_bits

    def compute_amax(self, *args, **kwargs):
        raise NotImplementedError("amax from a RangeHistogram: qat.calibrate.histogram_amax (modelopt's mse is wrong)")


def make_input_quantizer(calib_method="max"):
    """Per-tensor signed INT8 activation quantizer (range [-amax, amax] even for a non-negative
    tensor: TensorRT's activations are symmetric, zero point 0); max or histogram calibrator."""
    cfg = dict(num_bits=ACT_BITS, axis=None, narrow_range=False, pass_through_bwd=False,
               calibrator=RangeHistogram if calib_method in HISTOGRAM_METHODS else "max")
    return InputQuantizer(QuantizerAttributeConfig(**cfg))


def make_weight_quantizer(weight_bits=8):
    """Per-channel (axis 0) weight quantizer, always max-calibrated on the weight itself."""
    cfg = dict(num_bits=int(weight_bits), axis=0, narrow_range=True, pass_through_bwd=False, calibrator="max")
    return WeightQuantizer(QuantizerAttributeConfig(**cfg))


def disabled_quantizer():
    """A pass-through quantizer: keeps a skipped point in floating point."""
    q = make_input_quantizer()
    q.disable()
    return q


def is_quantizer(m):
    return isinstance(m, TensorQuantizer)


def calibrator_of(quantizer):
    """The quantizer's calibrator (MaxCalibrator or RangeHistogram). modelopt 0.47's TensorQuantizer
    keeps it in the private `_calibrator` with no public getter (only `bias_calibrator`); pinned in
    tests/qat/test_modelopt_contract.py."""
    return quantizer._calibrator


class QuantMixin:
    """`FLOAT` is the float class; `QUANT_POINTS` the quantizer attributes the subclass owns;
    `_quant_points(module)` lets a class own fewer (e.g. a bottleneck without shortcut)."""
    FLOAT = None
    QUANT_POINTS = ()

    @classmethod
    def _quant_points(cls, module):
        return cls.QUANT_POINTS


class QuantConv2d(QuantMixin, nn.Conv2d):
    FLOAT = nn.Conv2d
    QUANT_POINTS = ("input_quantizer", "weight_quantizer")

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantMaxPool2d(QuantMixin, nn.MaxPool2d):
    FLOAT = nn.MaxPool2d
    QUANT_POINTS = ("input_quantizer",)

    def forward(self, x):
        return super().forward(self.input_quantizer(x))


class QuantUpsample(QuantMixin, nn.Upsample):
    FLOAT = nn.Upsample
    QUANT_POINTS = ("input_quantizer",)

    def forward(self, x):
        return super().forward(self.input_quantizer(x))


class QuantConcat(QuantMixin, Concat):
    """yaml-level Concat (neck): every input through the same quantizer."""
    FLOAT = Concat
    QUANT_POINTS = ("input_quantizer",)

    def forward(self, x):
        return torch.cat([self.input_quantizer(t) for t in x], self.d)


class QuantRepNBottleneck(QuantMixin, RepNBottleneck):
    """Residual Add: `residual_quant` 'both' quantizes both inputs with one quantizer; 'shortcut' only
    the shortcut x (TensorRT's placement guide: the Add fuses into cv2's convolution as its residual)."""
    FLOAT = RepNBottleneck
    QUANT_POINTS = ("add_quantizer",)
    residual_quant = "both"

    @classmethod
    def _quant_points(cls, module):
        return cls.QUANT_POINTS if module.add else ()

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        if not self.add:
            return y
        return self.add_quantizer(x) + (self.add_quantizer(y) if self.residual_quant == "both" else y)


class QuantRepNCSP(QuantMixin, RepNCSP):
    FLOAT = RepNCSP
    QUANT_POINTS = ("cat_quantizer",)

    def forward(self, x):
        q = self.cat_quantizer
        return self.cv3(torch.cat((q(self.m(self.cv1(x))), q(self.cv2(x))), 1))


class _QuantELANForward:
    """ELAN1 and RepNCSPELAN4 share one forward: every Concat input through the one cat_quantizer."""
    QUANT_POINTS = ("cat_quantizer",)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in (self.cv2, self.cv3):
            y.append(m(y[-1]))
        return self.cv4(torch.cat([self.cat_quantizer(t) for t in y], 1))


class QuantELAN1(_QuantELANForward, QuantMixin, ELAN1):
    FLOAT = ELAN1


class QuantRepNCSPELAN4(_QuantELANForward, QuantMixin, RepNCSPELAN4):
    FLOAT = RepNCSPELAN4


class QuantADown(QuantMixin, ADown):
    """Quantized once after the avg-pool, at the MaxPool input and at the Concat."""
    FLOAT = ADown
    QUANT_POINTS = ("pool_quantizer", "maxpool_quantizer", "cat_quantizer")

    def forward(self, x):
        x1, x2 = self.pool_quantizer(F.avg_pool2d(x, 2, 1, 0, False, True)).chunk(2, 1)
        y2 = self.cv2(F.max_pool2d(self.maxpool_quantizer(x2), 3, 2, 1))
        return torch.cat((self.cat_quantizer(self.cv1(x1)), self.cat_quantizer(y2)), 1)


class QuantSPPELAN(QuantMixin, SPPELAN):
    """The three max pools are nn.MaxPool2d inside SP (quantized as QuantMaxPool2d); the Concat here."""
    FLOAT = SPPELAN
    QUANT_POINTS = ("cat_quantizer",)

    def forward(self, x):
        y = [self.cv1(x)]
        for m in (self.cv2, self.cv3, self.cv4):
            y.append(m(y[-1]))
        return self.cv5(torch.cat([self.cat_quantizer(t) for t in y], 1))


class QuantCBFuse(QuantMixin, CBFuse):
    """Elementwise sum of the resized CBLinear outputs and the last input: every addend quantized."""
    FLOAT = CBFuse
    QUANT_POINTS = ("add_quantizer",)

    def forward(self, xs):
        q = self.add_quantizer
        size = xs[-1].shape[2:]
        out = q(xs[-1])
        for i, x in enumerate(xs[:-1]):
            out = out + q(F.interpolate(x[self.idx[i]], size=size, mode="nearest"))
        return out


QUANT_CLASSES = {c.FLOAT: c for c in (QuantConv2d, QuantMaxPool2d, QuantUpsample, QuantConcat, QuantRepNBottleneck,
                                       QuantRepNCSP, QuantELAN1, QuantRepNCSPELAN4, QuantADown, QuantSPPELAN,
                                       QuantCBFuse)}


def to_quant(module, settings):
    """Turn a float module (exact class in QUANT_CLASSES) into its quantized subclass, in place."""
    cls = QUANT_CLASSES[type(module)]
    module.__class__ = cls
    for point in cls._quant_points(module):
        q = make_weight_quantizer(settings.weight_bits) if point == "weight_quantizer" else \
            make_input_quantizer(settings.calib_method)
        setattr(module, point, q)
    if cls is QuantRepNBottleneck:
        module.residual_quant = getattr(settings, "residual_quant", "both")
    return module


def to_float(module):
    """Undo `to_quant` in place: drop the quantizers, restore the float class."""
    if isinstance(module, QuantMixin):
        for name, child in list(module._modules.items()):  # not named_children(): it skips shared ones
            if child is not None and is_quantizer(child):
                delattr(module, name)
        module.__dict__.pop("residual_quant", None)
        module.__class__ = module.FLOAT
    return module
