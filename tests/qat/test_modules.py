"""qat.modules: --residual-quant both | shortcut (RepNBottleneck's residual Add), exported and linted."""
import warnings

import onnx
import pytest
import torch

import qat_testkit as kit
from qat.compat import UserError
from qat.settings import QuantSettings


def _export(mode, tmp_path):
    from qat.calibrate import calibrate
    from qat.export import export_qat_onnx
    from qat.quantize import quantize_model

    settings = QuantSettings(residual_quant=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantize_model(kit.fp32_model(), settings)
        calibrate(m, kit.calib_batches(), settings, show=False)
        path = export_qat_onnx(m.eval(), tmp_path / f"{mode}.onnx", kit.IMGSZ, batch_size=2)
    return m, path


def _residual_adds(path):
    """[(number of DequantizeLinear inputs, producer op of the other input)] of the Add nodes fed by a DQ."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type != "Add":
            continue
        prods = [producer.get(i) for i in n.input]
        dq = [p is not None and p.op_type == "DequantizeLinear" for p in prods]
        if any(dq):
            other = [p.op_type for p, d in zip(prods, dq) if not d and p is not None]
            out.append((sum(dq), other[0] if other else None))
    return out


def _matches_fake_quant(model, path):
    import onnxruntime as ort

    x = kit.images(2)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    y = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = kit.export_mode(model)(x).numpy()
    return abs(y - ref).max() / abs(ref).max()


@pytest.mark.parametrize("mode", ["both", "shortcut"])
def test_residual_placement_exports_and_lints_clean(mode, tmp_path):
    from qat.graph import metadata
    from qat.lint import lint

    model, path = _export(mode, tmp_path)
    adds = _residual_adds(path)
    assert len(adds) == 4  # the tiny model's four RepNBottlenecks
    if mode == "both":
        assert all(n == 2 for n, _ in adds)
    else:  # only the shortcut: the other input straight from cv2 (Conv + SiLU Mul)
        assert all(n == 1 and other in ("Conv", "Mul") for n, other in adds)
    assert metadata(path)["residual_quant"] == mode
    assert lint(path) == []
    assert _matches_fake_quant(model, path) < 1e-3


def test_lint_checks_the_recorded_placement(tmp_path):
    from qat.graph import save_onnx
    from qat.lint import lint

    _, path = _export("shortcut", tmp_path)
    m = onnx.load(str(path))
    next(p for p in m.metadata_props if p.key == "residual_quant").value = "both"
    save_onnx(m, path)
    v = lint(path)
    assert len(v) == 4 and all("only one quantized input" in line for line in v)


def test_setting_validated_and_old_checkpoints_default_to_both():
    assert QuantSettings.from_dict({"weight_bits": 8}).residual_quant == "both"
    with pytest.raises(UserError, match="residual-quant"):
        QuantSettings(residual_quant="input")


def test_shortcut_placement_survives_the_checkpoint(tmp_path):
    from qat.checkpoint import load_qat, save_qat
    from qat.modules import QuantRepNBottleneck

    model, _ = _export("shortcut", tmp_path)
    save_qat(tmp_path / "q.pt", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, settings, _ = load_qat(tmp_path / "q.pt")
    assert settings.residual_quant == "shortcut"
    blocks = [m for m in loaded.modules() if isinstance(m, QuantRepNBottleneck)]
    assert blocks and all(m.residual_quant == "shortcut" for m in blocks)
    x = kit.images(2)
    with torch.no_grad():
        assert torch.equal(kit.export_mode(loaded)(x), kit.export_mode(model)(x))


def test_input_quantizer_keeps_the_layout_and_modelopts_values():
    """Fake quantization leaves a channels_last activation channels_last (modelopt's forward would make it
    NCHW, and the next convolution would turn it back), with modelopt's values; calibration and a
    disabled quantizer still go through modelopt's forward."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from qat.modules import disabled_quantizer, make_input_quantizer

    x = (torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0)) * 2).contiguous(
        memory_format=torch.channels_last)
    q = make_input_quantizer()
    q.amax = torch.tensor(2.0)
    ref = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=None, narrow_range=False))
    ref.amax = torch.tensor(2.0)
    y = q(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.equal(y, ref(x))
    assert len(torch.unique(y)) > 20 and float(y.abs().max()) <= 2.0 * 128 / 127 + 1e-6  # the grid: -128..127

    calib = make_input_quantizer()
    calib.disable_quant()
    calib.enable_calib()
    assert torch.equal(calib(x), x)  # statistics only
    calib.disable_calib()
    calib.load_calib_amax()
    assert torch.isclose(calib.amax, x.abs().max())
    assert disabled_quantizer()(x) is x


def test_quantize_once_quantizes_a_tensor_once_per_forward():
    """Inside quantize_once() a quantizer meeting the same, unchanged tensor again returns its first output;
    a new or modified tensor, or any call outside, is quantized again."""
    from qat.modules import make_input_quantizer, quantize_once

    q = make_input_quantizer()
    q.amax = torch.tensor(2.0)
    calls = []
    real = q._fake_quantize
    q._fake_quantize = lambda t: calls.append(1) or real(t)
    x = torch.randn(2, 4, 3, 3)
    with quantize_once():
        y = q(x)
        assert q(x) is y and len(calls) == 1
        assert torch.equal(q(x.clone()), y) and len(calls) == 2
        x.mul_(2)  # changed in place: quantized again
        assert not torch.equal(q(x), y) and len(calls) == 3
    q(x), q(x)
    assert len(calls) == 5


def test_quantize_once_gives_the_same_gradients_with_fewer_quantizations():
    """A quantized model with learned ranges: loss, weight and range gradients with the cache equal
    those without it, while some activations (one tensor at a shared quantizer) are quantized once."""
    from qat.learned_ranges import LearnedRangeQuantizer, enable_learned_ranges
    from qat.modules import quantize_once

    model = kit.qat_model().train()
    enable_learned_ranges(model)
    calls = []
    real = LearnedRangeQuantizer._fake_quantize
    x = kit.images(2)

    def grads(cache):
        model.zero_grad(set_to_none=True)
        calls.clear()
        with quantize_once() if cache else torch.enable_grad():
            out = model(x)
        loss = sum((t.float() ** 2).mean() for t in (out if isinstance(out, (list, tuple)) else [out]))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    try:
        LearnedRangeQuantizer._fake_quantize = lambda self, t: calls.append(1) or real(self, t)
        loss0, g0, n0 = grads(cache=False)
        loss1, g1, n1 = grads(cache=True)
    finally:
        LearnedRangeQuantizer._fake_quantize = real
    assert n1 < n0 and loss1 == loss0 and g1.keys() == g0.keys()
    assert any("log_amax" in n for n in g0)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-7), n
