"""qat.lint: every rule flags its violation; a clean export passes; the CLI exits 1 / 0 / 2."""
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qat_testkit as kit
from qat.graph import constants_to_initializers, metadata
from qat.lint import lint, main, summary


def _model():
    return constants_to_initializers(onnx.load(str(kit.onnx_path("qat"))))


def _first(m, op, weight=None):
    inits = {t.name for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == op and (weight is None or (n.input[0] in inits) == weight):
            return n
    raise AssertionError(op)


def _lint(m, tmp_path, **kw):
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    return lint(p, **kw)


def test_clean_export_passes_and_cli_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main([str(kit.onnx_path("qat"))])
    assert e.value.code == 0
    assert "ok (" in capsys.readouterr().out


def test_zero_point_must_be_int8_zero(tmp_path):
    m = _model()
    q = _first(m, "QuantizeLinear", weight=False)
    m.graph.initializer.append(numpy_helper.from_array(np.array(3, np.int8), "zp3"))
    q.input[2] = "zp3"
    v = _lint(m, tmp_path)
    assert any("zero point" in s and q.name in s for s in v)


def test_weight_scale_must_be_per_channel_axis_0(tmp_path):
    m = _model()
    q = _first(m, "QuantizeLinear", weight=True)
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] == q.input[1]:
            for a in n.attribute:
                if a.name == "axis":
                    a.i = 1
    assert any("axis 1" in s and "per output channel" in s for s in _lint(m, tmp_path))


def test_dangling_nodes_and_leftover_casts(tmp_path):
    m = _model()
    src = m.graph.node[0].output[0]
    m.graph.node.append(helper.make_node("Relu", [src], ["unused_out"], name="stray_relu"))
    m.graph.node.append(helper.make_node("QuantizeLinear", [src, m.graph.node[0].input[1], m.graph.node[0].input[2]],
                                         ["q_alone"], name="lonely_q"))
    v = _lint(m, tmp_path)
    assert any("stray_relu" in s and "dangling" in s for s in v)
    assert any("lonely_q" in s and "not followed by a DequantizeLinear" in s for s in v)
    raw = lint(kit.onnx_path("qat_raw"))  # as torch.onnx wrote it: modelopt's casts still there
    assert raw and all("float-to-float Cast" in s for s in raw)


def test_float_layers_must_stay_float_and_the_rest_int8(tmp_path):
    # the head of a fully quantized model, declared float: every quantized head conv is reported
    v = lint(kit.onnx_path("qat"), float_layers=[r"^model\.12\."])
    assert sum("should stay float" in s for s in v) == 18
    # a float model checked as QAT: no Q/DQ at all
    assert lint(kit.onnx_path("fp32")) == ["no QuantizeLinear/DequantizeLinear nodes: a float model, not a QAT "
                                           "export"]
    # one conv left without its input Q/DQ: quantized on the weight only, always a violation
    m = _model()
    conv = _first(m, "Conv")
    producer = {o: n for n in m.graph.node for o in n.output}[conv.input[0]]
    conv.input[0] = {o: n for n in m.graph.node for o in n.output}[producer.input[0]].input[0]
    assert any("on its weight only" in s and "model.0.conv" in s for s in _lint(m, tmp_path))


def test_float_layers_come_from_the_graph_not_the_metadata(tmp_path):
    """A --no-last-layer export records its head as float in its metadata; lint reads the float
    convolutions from the graph and, given the expected ones, compares: the file's own claim is no
    evidence (an exporter that wrote a wrong claim, or a file edited after export, is caught)."""
    head = kit.onnx_path("qat_nll")
    claim = metadata(head)["float_layers"]
    assert claim and summary(head)["float_layers"]  # the head convs are float in the graph
    assert lint(head) == []  # no expectation: a clean file with float layers
    assert lint(head, float_layers=claim) == []  # as the checkpoint's settings say
    v = lint(head, float_layers=[])  # expected all INT8: every float head conv is reported
    assert len(v) == len(summary(head)["float_layers"]) - 1 and all("runs in float" in s for s in v)  # - the DFL
    # a fully quantized file whose metadata claims the head is float: the claim changes nothing
    m = onnx.load(str(kit.onnx_path("qat")))
    next(p for p in m.metadata_props if p.key == "float_layers").value = json.dumps(claim)
    assert _lint(m, tmp_path) == []
    assert sum("should stay float" in s for s in lint(kit.onnx_path("qat"), float_layers=claim)) == 18


def test_cli_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(kit.onnx_path("fp32"))])
    assert e.value.code == 1
    assert "violation: no QuantizeLinear" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.onnx")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not found" in err[0]
