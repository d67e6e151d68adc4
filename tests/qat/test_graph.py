"""qat.graph: the Q/DQ post-process (DESIGN.md section 4). The OpenVINO-path rewrites: tests/qat/deploy/."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qat_testkit as kit
from qat.graph import constants_to_initializers, format_report, import_graph, postprocess, scale_classes
from qat.lint import lint
from qat.settings import QuantSettings


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
    assert np.array_equal(kit.run_ort(raw, x), kit.run_ort(tmp_path / "pp.onnx", x))  # cleaning changes nothing
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


def _one_channel_conv_model():
    """images -> activation Q/DQ -> Conv whose weight (1 output channel, a single-class head's class
    conv) has a per-tensor (scalar) Q/DQ, as torch.onnx exports it for nc=1."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (1, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0.02, np.float32), "s_act"),
             numpy_helper.from_array(np.array(np.abs(w).max() / 127, np.float32), "s_w"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["images", "s_act", "zp"], ["xq"], name="act_q"),
             helper.make_node("DequantizeLinear", ["xq", "s_act", "zp"], ["xd"], name="act_dq"),
             helper.make_node("QuantizeLinear", ["W", "s_w", "zp"], ["wq"], name="w_q"),
             helper.make_node("DequantizeLinear", ["wq", "s_w", "zp"], ["wd"], name="w_dq"),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="/model.0/conv/Conv", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "one_channel", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                   [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_single_output_channel_weight_becomes_per_channel(tmp_path):
    m = _one_channel_conv_model()
    onnx.save(m, tmp_path / "raw.onnx")
    assert any("per-tensor weight scale" in v for v in lint(tmp_path / "raw.onnx"))
    report = postprocess(tmp_path / "raw.onnx", tmp_path / "pp.onnx")
    assert report["weights_made_per_channel"] == 1
    assert lint(tmp_path / "pp.onnx") == []
    pp = onnx.load(str(tmp_path / "pp.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in pp.graph.initializer}
    for node in pp.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.name.startswith("w_"):
            assert inits[node.input[1]].shape == (1,) and inits[node.input[2]].shape == (1,)
            assert helper_attr(node, "axis") == 0
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert np.array_equal(kit.run_ort(m, x), kit.run_ort(pp, x))  # the same numbers


def helper_attr(node, name):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_uint8_rewrite_leaves_a_per_tensor_weight_alone():
    """The OpenVINO rewrite (qat.deploy.openvino) on the nc=1 head conv built above."""
    from qat.deploy.openvino_rewrites import activations_to_uint8

    m = _one_channel_conv_model()
    u8 = onnx.ModelProto()
    u8.CopyFrom(m)
    assert activations_to_uint8(u8) == 2  # the activation pair only
    by_name = {n.name: n for n in u8.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in u8.graph.initializer}
    assert inits[by_name["act_dq"].input[2]].dtype == np.uint8
    assert inits[by_name["w_q"].input[2]].dtype == np.int8 and inits[by_name["w_dq"].input[2]].dtype == np.int8
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert np.array_equal(kit.run_ort(m, x), kit.run_ort(u8, x))


def test_written_onnx_has_the_usual_mode(tmp_path):
    """Issue 16 (minor): the post-processed ONNX is readable by others like any file the user writes
    (the atomic temp file starts as mkstemp's 0600)."""
    import os
    import stat

    raw = kit.onnx_path("qat_raw", tmp_path)
    umask = os.umask(0o022)
    try:
        postprocess(raw, tmp_path / "pp.onnx")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "pp.onnx").stat().st_mode) == 0o644


@pytest.mark.parametrize("cfg", ["yolov9-c", "gelan-e"])
def test_dual_head_and_cbfuse_exports(cfg, tmp_path):
    """yolov9-c (DualDDetect: the main head exported, the auxiliary branch pruned) and gelan-e
    (CBLinear / CBFuse in the backbone), thin, random weights, small input: after the pass every class
    agrees. Each CBFuse sum of 3+ addends is one class (the torch rules' one quantizer), so a third
    addend with another scale is caught by lint and unified by the pass."""
    from qat.calibrate import calibrate
    from qat.export import export_qat_onnx
    from qat.quantize import quantize_model

    q = quantize_model(kit.fp32_model(cfg), QuantSettings())
    calibrate(q, [kit.noise_images(2, seed=3)], QuantSettings(), show=False)
    path = export_qat_onnx(q, tmp_path / f"{cfg}.onnx", 64)
    assert lint(path) == []
    classes = scale_classes(import_graph(path))
    assert classes and all(c.agrees() for c in classes)
    chains = [c for c in classes if sum("/Add" in op for op in c.ops) >= 2 and len(c.pairs) >= 3]
    if cfg == "yolov9-c":
        assert not chains  # its CBFuse sits in the auxiliary branch, which the export drops
        return
    assert chains, [c.ops for c in classes]

    # give the last addend of one chain its own scale: lint reports the group, the pass unifies it
    m = onnx.load(str(path))
    target = chains[0].pairs[-1]
    for node in m.graph.node:
        if node.name in (target.q.name, target.dq.name):
            init = next(t for t in m.graph.initializer if t.name == node.input[1])
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(m, tmp_path / "mismatch.onnx")
    assert any("scale mismatch" in v for v in lint(tmp_path / "mismatch.onnx"))
    report = postprocess(tmp_path / "mismatch.onnx", tmp_path / "fixed.onnx")
    assert report["scale_changes"] and lint(tmp_path / "fixed.onnx") == []


def test_add_chain_of_three_addends_is_one_class():
    """CBFuse's sum as exported: (a + b) + c, each addend through its own Q/DQ pair. All three pairs
    must share one scale (one quantizer on the torch side); the partial sum a + b joins them."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.array(s, np.float32), f"s{i}") for i, s in enumerate((0.1, 0.1, 0.3))]
    inits.append(numpy_helper.from_array(np.array(0, np.int8), "zp"))
    nodes = []
    for i, x in enumerate("abc"):
        nodes += [helper.make_node("QuantizeLinear", [x, f"s{i}", "zp"], [f"{x}q"], name=f"{x}_q"),
                  helper.make_node("DequantizeLinear", [f"{x}q", f"s{i}", "zp"], [f"{x}d"], name=f"{x}_dq")]
    nodes += [helper.make_node("Add", ["ad", "bd"], ["t"], name="/model.16/Add"),
              helper.make_node("Add", ["t", "cd"], ["y"], name="/model.16/Add_1")]
    info = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, 4, 4]) for x in "abc"]
    graph = helper.make_graph(nodes, "cbfuse", info, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                    [1, 2, 4, 4])], inits)
    classes = scale_classes(import_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert len(classes) == 1 and len(classes[0].pairs) == 3 and not classes[0].agrees()
