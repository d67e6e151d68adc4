"""qat.graph: the Q/DQ post-process (DESIGN.md section 4). The OpenVINO-path rewrites: tests/qat/deploy/."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qat_testkit as kit
from qat.graph import constants_to_initializers, format_report, import_graph, postprocess, scale_classes
from qat.lint import lint


def test_postprocess_of_a_ruled_model_changes_no_scale_and_no_output(tmp_path):
    raw = kit.onnx_path("qat_raw", tmp_path)
    before = onnx.load(str(raw))
    assert any(n.op_type == "Cast" for n in before.graph.node)  # modelopt's float-to-float casts
    r = postprocess(raw, tmp_path / "pp.onnx")
    assert r["scale_changes"] == [] and r["groups"] == r["groups_agreeing"] > 5
    assert r["casts_removed"] > 0 and r["duplicates_merged"] > 0 and r["nodes_after"] < r["nodes_before"]
    after = onnx.load(str(tmp_path / "pp.onnx"))
    assert not any(n.op_type in ("Cast", "Constant", "Identity") for n in after.graph.node)
    assert {p.key for p in after.metadata_props} >= {"qat", "float_layers", "strides"}
    assert "0 scale(s) changed" in format_report(r)
    x = kit.images(2)
    assert np.array_equal(kit.ort_outputs(raw, x), kit.ort_outputs(tmp_path / "pp.onnx", x))  # cleaning changes nothing computed
    assert postprocess(tmp_path / "pp.onnx")["duplicates_merged"] == 0  # idempotent


def _concat_class(graph):
    classes = [c for c in scale_classes(graph) if any("Concat" in op for op in c.ops)]
    return max(classes, key=lambda c: len(c.pairs))


def test_mismatched_scales_are_flagged_by_lint_and_fixed_by_postprocess(tmp_path):
    path = kit.onnx_path("qat", tmp_path)
    graph = import_graph(path)
    c = _concat_class(graph)
    victim, scale = c.pairs[1].q.name, float(c.scales()[0])
    # make the file as a quantizer without the rules would: one Concat input on its own, smaller scale
    m = constants_to_initializers(onnx.load(str(path)))
    q = next(n for n in m.graph.node if n.name == victim)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    m.graph.initializer.append(numpy_helper.from_array(np.array(scale / 2, np.float32), "bad_scale"))
    q.input[1] = dq.input[1] = "bad_scale"
    onnx.save(m, str(path))

    violations = lint(path)
    assert len(violations) == 1 and "scale mismatch" in violations[0] and victim in violations[0]
    r = postprocess(path)
    assert [(name, round(old / 127, 9), round(new / 127, 9)) for name, old, new in r["scale_changes"]] == \
        [(victim, round(scale / 2, 9), round(scale, 9))]  # the largest amax wins
    assert lint(path) == []
    fixed = _concat_class(import_graph(path))
    assert fixed.agrees() and abs(fixed.scales()[0] - scale) < 1e-12


def test_postprocess_bad_input(tmp_path):
    from utils.general import UserError

    with pytest.raises(UserError, match="not found"):
        postprocess(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX"):
        postprocess(tmp_path / "junk.onnx")
