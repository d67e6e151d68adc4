"""qat.sensitivity: one layer at a time in float (neighbours keep their shared quantizer), and the
greedy auto-skip."""
import pytest

from qat.quantize import quantize_model
from qat.rules import quantizer_slots
from qat.sensitivity import auto_skip, layer_sensitivity, layers_in_float, quantized_layers, skip_regex
from qat.settings import QuantSettings
from qat_testkit import fp32_model


def _enabled(model, prefix):
    return [name for name, _, _, q in quantizer_slots(model) if name.startswith(prefix) and not q._disabled]


def test_layers_in_float_is_temporary_and_local():
    q = quantize_model(fp32_model("gelan-t"), QuantSettings(no_last_layer=True))
    before = {name: q_ for name, _, _, q_ in quantizer_slots(q)}
    assert 22 not in quantized_layers(q) and quantized_layers(q) == list(range(22))
    with layers_in_float(q, [12]) as n:
        assert n == len([k for k in before if k.startswith("model.12.")]) and not _enabled(q, "model.12.")
        assert not q.model[11].input_quantizer._disabled  # the neighbour in layer 12's group stays quantized
    assert {name: q_ for name, _, _, q_ in quantizer_slots(q)} == before


def test_ranking_and_auto_skip_greedy():
    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    cost = {2: 0.004, 4: 0.003, 8: 0.001}  # mAP each layer loses when quantized

    def val_fn(model):
        quantized = {int(n.split(".")[1]) for n, _, _, q_ in quantizer_slots(model) if not q_._disabled}
        m = 0.5 - sum(c for i, c in cost.items() if i in quantized)
        return {"map": m, "map50": m + 0.1}

    base, ranked = layer_sensitivity(q, val_fn, show=False)
    assert base == pytest.approx(0.492) and [r["layer"] for r in ranked[:3]] == [2, 4, 8]
    assert ranked[0]["gain"] == pytest.approx(0.004) and ranked[0]["type"] == "ELAN1"
    layers, reached, trail = auto_skip(q, ranked, val_fn, fp32_map=0.5, budget=0.0015, base_map=base)
    assert layers == [2, 4] and reached == pytest.approx(0.499) and [t[0] for t in trail] == [[2], [2, 4]]
    assert skip_regex(4) == r"^model\.4\."
