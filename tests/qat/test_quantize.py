"""qat.quantize / qat.modules: fake-quant output close to FP32, 7-bit weights (in training and in
the exported INT8 Q/DQ), the float copy a checkpoint stores."""
import warnings

import numpy as np
import pytest
import torch

from qat.calibrate import calibrate
from qat.modules import QuantConv2d, QuantMixin, is_quantizer
from qat.quantize import (clamp_weights_to_range, float_copy, is_quantized, quantize_model, quantizer_summary,
                          set_quant_enabled)
from qat.settings import QuantSettings
from qat_testkit import fp32_model, noise_images, unfused_model


def _layer_outputs(model, x):
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o))
               for i, m in enumerate(model.model)]
    model.train()  # raw head maps
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    flat = {}
    for i, o in outs.items():
        ts = [o] if torch.is_tensor(o) else [t for v in o for t in ([v] if torch.is_tensor(v) else v)]
        flat[i] = torch.cat([t.flatten() for t in ts])
    return flat


@pytest.mark.parametrize("cfg", ["gelan-t", "gelan-c"])
def test_fake_quant_close_to_fp32(cfg):
    fp32 = fp32_model(cfg)
    q = quantize_model(fp32_model(cfg), QuantSettings())
    calibrate(q, [noise_images(4, seed=3)], show=False)
    x = noise_images(2, seed=4)  # other images than calibration
    a, b = _layer_outputs(fp32, x), _layer_outputs(q, x)
    for i in a:
        rel = float((a[i] - b[i]).norm() / a[i].norm().clamp(min=1e-12))
        assert rel < 0.05, (i, rel)  # INT8 error per layer, not a broken scale
    set_quant_enabled(q, False)
    b = _layer_outputs(q, x)
    assert all(torch.equal(a[i], b[i]) for i in a)  # quantizers off: exactly the FP32 network
    set_quant_enabled(q, True)


def test_unfused_model_is_fused_and_double_quantize_refused():
    m = quantize_model(unfused_model("gelan-t"), QuantSettings())
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) and is_quantized(m)
    with pytest.raises(ValueError):
        quantize_model(m, QuantSettings())


def test_weight_bits_7_grid():
    q = quantize_model(fp32_model("gelan-t"), QuantSettings(weight_bits=7))
    calibrate(q, [noise_images(2)], show=False)
    assert {r["bits"] for r in quantizer_summary(q) if r["kind"] == "weight"} == {7}
    conv = q.model[3].cv1.conv
    wq = conv.weight_quantizer
    with torch.no_grad():
        conv.weight[0].mul_(1.5)  # a weight outside its calibrated range is clipped at +-63 steps too
        k = wq(conv.weight) / (wq.amax / 63)
    assert torch.allclose(k, k.round(), atol=1e-3) and k.abs().max() <= 63 + 1e-3
    assert k.abs().max() > 62  # the range is used


def _qdq_weights(path):
    """|q| of every weight that reaches a QuantizeLinear straight from an initializer/Constant."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    const.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    out = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in const and const[n.input[0]].ndim == 4:
            w, scale, zp = const[n.input[0]], const[n.input[1]], const[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()  # symmetric INT8, zero point 0 (TensorRT/OpenVINO)
            q = np.round(w / scale.reshape(-1, 1, 1, 1))
            out.append(np.abs(q).max())
    return out


def test_export_int8_qdq_weights(tmp_path, bits=7):
    """7-bit weights export as ordinary INT8 Q/DQ (scale amax/63) with |q| <= 63; ONNX Runtime on
    the Q/DQ graph reproduces the fake-quant forward."""
    import onnxruntime as ort

    q = quantize_model(fp32_model("gelan-t"), QuantSettings(weight_bits=bits))
    calibrate(q, [noise_images(2)], show=False)
    q.eval()
    clamp_weights_to_range(q)
    head = q.model[-1]
    head.export = True
    x = noise_images(1, seed=5)
    f = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(q, x, str(f), opset_version=17, dynamo=False, input_names=["images"])
    qmax = _qdq_weights(f)
    n_convs = sum(isinstance(m, QuantConv2d) for m in q.modules())
    assert len(qmax) == n_convs
    assert max(qmax) <= (63 if bits == 7 else 127) and max(qmax) >= (62 if bits == 7 else 126)
    y = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        yt = q(x)
    assert np.abs(y - yt.numpy()).max() < 1e-3 * max(1.0, float(yt.abs().max()))


def test_float_copy_is_plain():
    fp32 = fp32_model("gelan-t")
    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    calibrate(q, [noise_images(2)], show=False)
    f = float_copy(q)
    assert not any(is_quantizer(m) or isinstance(m, QuantMixin) for m in f.modules()) and not hasattr(f, "qat")
    assert {type(m) for m in f.modules()} == {type(m) for m in fp32.modules()}
    x = noise_images(1)
    with torch.no_grad():
        assert torch.equal(f.eval()(x)[0], fp32.eval()(x)[0])  # calibrated on these weights: nothing clipped
    assert is_quantized(q)  # the original is untouched
