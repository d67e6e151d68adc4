"""The modelopt internals qat/ relies on, pinned so a modelopt upgrade fails here, by name, instead of
deep inside calibration or export. Each message says which of our files to revisit.

Private (underscore) names still used, and why (no public API in modelopt 0.47):
- TensorQuantizer._calibrator (qat.modules.calibrator_of): no public getter for the calibrator.
- TensorQuantizer._fake_quantize / _get_amax / _pass_through_bwd (qat.modules.WeightQuantizer): the
  export-time INT8 grid for 7-bit weights overrides the one fake-quantization step.
- TensorQuantizer._if_quant / _if_calib / _disabled / _fake_quant (qat.modules.InputQuantizer): when its
  forward would only fake-quantize, it skips modelopt's forward (which makes channels_last inputs NCHW).
- MaxCalibrator._calib_amax (qat.calibrate._merge_across_ranks): the DDP-merged max written back.
- HistogramCalibrator._calib_hist / _calib_bin_edges / _num_bits and reset() (qat.modules.RangeHistogram).
"""
import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from modelopt.torch.quantization.calib import HistogramCalibrator, MaxCalibrator
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.tensor_quant import FakeTensorQuantFunction

from qat.modules import RangeHistogram, calibrator_of, make_input_quantizer, make_weight_quantizer

PINNED = "0.47.0"
MODULES = "qat/modules.py (WeightQuantizer, RangeHistogram, calibrator_of)"
CALIBRATE = "qat/calibrate.py (_merge_across_ranks, calibrate)"


def _collect(q, x):
    """Run x through q in calibration mode (statistics only, no quantization), as qat.calibrate does."""
    q.disable_quant()
    q.enable_calib()
    q(x)
    q.disable_calib()
    q.enable_quant()


def test_installed_version_is_the_pinned_one():
    requirements = (Path(__file__).resolve().parents[2] / "requirements.txt").read_text()
    assert f"nvidia-modelopt=={PINNED}" in requirements, "requirements.txt and this contract disagree on modelopt"
    assert version("nvidia-modelopt") == PINNED, (
        f"modelopt {version('nvidia-modelopt')} is installed, this contract was checked for {PINNED}: run this "
        f"file, revisit {MODULES} and {CALIBRATE}, then move the pin here and in requirements.txt")


@pytest.mark.parametrize("method, cls", [("max", MaxCalibrator), ("mse", RangeHistogram)])
def test_calibrator_is_private_calibrator_and_collects(method, cls):
    q = make_input_quantizer(method)
    assert isinstance(getattr(q, "_calibrator", None), cls), \
        f"TensorQuantizer._calibrator is gone or changed type: revisit calibrator_of in {MODULES}"
    x = torch.tensor([[-3.0, 0.5, 2.0]])
    _collect(q, x)
    cal = calibrator_of(q)
    got = cal.compute_amax() if cls is MaxCalibrator else cal.running_max
    assert got is not None and float(got) == 3.0, \
        f"the forward in calibration mode no longer feeds TensorQuantizer._calibrator: revisit {MODULES}"


def test_max_calibrator_calib_amax_is_what_load_calib_amax_loads():
    q = make_input_quantizer("max")
    cal = calibrator_of(q)
    assert cal.compute_amax() is None, "MaxCalibrator must start empty (qat.calibrate's no-data check)"
    _collect(q, torch.tensor([1.0, -2.5]))
    assert torch.equal(cal._calib_amax, cal.compute_amax()), \
        f"MaxCalibrator._calib_amax no longer holds the running max: revisit {CALIBRATE}"
    cal._calib_amax = torch.tensor(7.0)  # what the DDP merge does with the all-reduced max
    q.load_calib_amax()
    assert float(q.amax) == 7.0, f"load_calib_amax ignores MaxCalibrator._calib_amax: revisit {CALIBRATE}"
    cal.reset()
    assert cal._calib_amax is None and cal.compute_amax() is None, "MaxCalibrator.reset() keeps its max"


def test_histogram_calibrator_fields_reset_and_num_bits():
    params = inspect.signature(HistogramCalibrator.__init__).parameters
    assert list(params)[1:4] == ["num_bits", "axis", "unsigned"] and {"num_bins", "torch_hist"} <= set(params), \
        f"HistogramCalibrator's constructor changed: revisit RangeHistogram in {MODULES}"
    q = make_input_quantizer("percentile")
    cal = calibrator_of(q)
    assert cal.num_bits == q.num_bits == 8, f"HistogramCalibrator._num_bits is not the quantizer's bits: {MODULES}"
    q.num_bits = 7
    assert cal.num_bits == 7, f"TensorQuantizer.num_bits no longer sets the calibrator's _num_bits: {MODULES}"
    _collect(q, torch.linspace(-1, 1, 101))
    assert cal.hist is not None and cal.bin_edges is not None
    HistogramCalibrator.reset(cal)  # the base reset alone must free RangeHistogram's counts (free_histograms)
    assert cal._calib_hist is None and cal._calib_bin_edges is None, \
        f"HistogramCalibrator.reset() no longer clears _calib_hist / _calib_bin_edges: revisit {MODULES}"


def test_forward_delegates_to_fake_quantize():
    assert list(inspect.signature(TensorQuantizer._fake_quantize).parameters) == ["self", "inputs"], \
        f"TensorQuantizer._fake_quantize(inputs) changed: revisit WeightQuantizer in {MODULES}"
    calls = []

    class Spy(TensorQuantizer):
        def _fake_quantize(self, inputs):
            calls.append(inputs)
            return inputs * 0 + 42

    q = Spy(QuantizerAttributeConfig(num_bits=8, axis=None))
    q.amax = torch.tensor(1.0)
    out = q(torch.ones(3))
    assert calls and torch.equal(out, torch.full((3,), 42.0)), \
        f"TensorQuantizer.forward no longer goes through _fake_quantize: WeightQuantizer's export grid is skipped ({MODULES})"


def test_state_flags_follow_the_public_switches():
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None))
    assert (q._if_quant, q._if_calib, q._disabled, q._fake_quant) == (True, False, False, True), \
        f"TensorQuantizer's default _if_quant/_if_calib/_disabled/_fake_quant changed: revisit InputQuantizer in {MODULES}"
    q.disable_quant()
    q.enable_calib()
    assert (q._if_quant, q._if_calib) == (False, True), \
        f"disable_quant/enable_calib no longer set _if_quant/_if_calib: revisit InputQuantizer in {MODULES}"
    q.disable()
    assert q._disabled, f"disable() no longer sets _disabled: revisit InputQuantizer in {MODULES}"


def test_get_amax_is_the_loaded_amax_and_pass_through_bwd_is_the_config():
    w = make_weight_quantizer(7)
    w.amax = torch.tensor([[[[0.5]]], [[[2.0]]]])
    got = w._get_amax(torch.zeros(2, 1, 1, 1))
    assert torch.equal(got, w.amax), f"TensorQuantizer._get_amax is not the loaded amax: revisit {MODULES}"
    assert w._pass_through_bwd is False, f"TensorQuantizer._pass_through_bwd is not the config field: {MODULES}"
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, pass_through_bwd=True))
    assert q._pass_through_bwd is True, f"TensorQuantizer._pass_through_bwd is not the config field: {MODULES}"


def test_fake_tensor_quant_positional_order():
    names = list(inspect.signature(FakeTensorQuantFunction.forward).parameters)[1:]
    assert names == ["inputs", "amax", "bias", "num_bits", "unsigned", "narrow_range", "trt_high_precision_dtype",
                     "pass_through_bwd", "block_size", "axis"], \
        f"fake_tensor_quant's positional arguments moved: WeightQuantizer calls it positionally ({MODULES})"
