"""Rewrites of a copy of a Q/DQ graph for OpenVINO's CPU plugin (DESIGN.md section 5); the
TensorRT-shaped file stays as it is. All lossless except `requantize_weights` (7-bit weights for CPUs
without VNNI / AMX, where 8-bit ones saturate)."""
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from qat.graph import QDQ_OPS, constants_to_initializers


def _initializers(model):
    return {t.name: t for t in model.graph.initializer}

def activations_to_uint8(model):
    """Rewrite every activation Q/DQ pair (per-tensor, int8, zero point 0) to uint8 with zero point
    128, in place. Same scale: q_u8 = q_i8 + 128 over the same range, so the values are identical
    (lossless); OpenVINO's CPU plugin then runs every convolution in u8 (DESIGN.md section 5).
    Returns the number of Q/DQ nodes rewritten."""
    constants_to_initializers(model)
    inits = _initializers(model)
    name = "qat_activation_zero_point_u8"
    n = 0
    q_outputs = set()
    weight_q_outputs = {x.output[0] for x in model.graph.node if x.op_type == "QuantizeLinear" and x.input[0] in inits}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            continue  # a weight
        if node.op_type == "DequantizeLinear" and node.input[0] in weight_q_outputs:
            continue  # a weight's DQ (also a per-tensor one: its Q stays int8)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            continue  # a pre-quantized weight
        scale = numpy_helper.to_array(inits[node.input[1]])
        if scale.size != 1:
            continue
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            continue
        if name not in inits:
            t = numpy_helper.from_array(np.array(128, dtype=np.uint8), name)
            model.graph.initializer.append(t)
            inits[name] = t
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        if node.op_type == "QuantizeLinear":
            q_outputs.add(node.output[0])
        n += 1
    for vi in list(model.graph.value_info) + list(model.graph.output):  # recorded types follow: int8 -> uint8
        if vi.name in q_outputs and vi.type.tensor_type.elem_type == onnx.TensorProto.INT8:
            vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return n

def _weight_pairs(model):
    """[(Q node, DQ node)] of weights: QuantizeLinear of an initializer followed by a DequantizeLinear."""
    inits = _initializers(model)
    consumers = defaultdict(list)
    for node in model.graph.node:
        for t in node.input:
            consumers[t].append(node)
    out = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            dqs = [c for c in consumers[node.output[0]] if c.op_type == "DequantizeLinear"]
            out += [(node, dq) for dq in dqs]
    return out

def weight_levels(model):
    """{weight name: largest |q|} of every Q/DQ-quantized weight (127 = full int8, <= 64 = 7-bit)."""
    constants_to_initializers(model)
    inits = _initializers(model)
    out = {}
    for q, _ in _weight_pairs(model):
        w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        axis = q.attribute[0].i if q.attribute else 1
        if s.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        out[q.input[0]] = int(np.abs(np.rint(w / s)).max()) if w.size else 0
    return out

def requantize_weights(model, bits=7):
    """Weights whose integer values exceed `bits` (|q| > 2^(bits-1)) -> the same range on a
    `bits` grid: scale * 127 / (2^(bits-1) - 1), in place. Returns the names re-quantized.

    Why: on x86 CPUs without VNNI/AMX, OpenVINO's u8 x s8 kernels add pairs of products in 16 bits
    and saturate with full-range int8 weights (DESIGN.md section 5). Post-training this costs
    accuracy; a model trained with --weight-bits 7 needs no change (and gets none)."""
    constants_to_initializers(model)
    inits = _initializers(model)
    top = 2 ** (bits - 1) - 1
    done = []
    levels = weight_levels(model)
    for q, dq in _weight_pairs(model):
        if levels.get(q.input[0], 0) <= top + 1:
            continue
        s = numpy_helper.to_array(inits[q.input[1]])
        new = (s.astype(np.float64) * 127.0 / top).astype(s.dtype)
        name = q.input[1] + f"_w{bits}"
        if name not in inits:
            t = numpy_helper.from_array(new, name)
            model.graph.initializer.append(t)
            inits[name] = t
        q.input[1] = name
        dq.input[1] = name
        done.append(q.input[0])
    return sorted(set(done))

def _qdq_params(node, inits):
    """(scale, zero point) arrays of a Q/DQ node whose parameters are initializers, else None."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is not None and zp not in inits:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return (numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[zp]) if zp else None, axis)

def _same_params(a, b):
    return a is not None and b is not None and a[2] == b[2] and np.array_equal(a[0], b[0]) and \
        ((a[1] is None and b[1] is None) or (a[1] is not None and b[1] is not None and a[1].dtype == b[1].dtype
                                             and np.array_equal(a[1], b[1])))

def quantize_before_slices(model):
    """Where a tensor is cut by Slice/Split nodes and every part goes straight into a Q/DQ pair with
    the same scale (RepNCSPELAN4 / ELAN1 cut cv1's output in two halves, each quantized with the
    block's shared scale), quantize the tensor once before the cut instead, in place. Elementwise
    quantization commutes with slicing, so the values are identical; OpenVINO then fuses the Q/DQ into
    the producing convolution (INT8 output) and cuts INT8 data, where the per-part Q/DQ left an f32
    convolution output, an f32 Split and a FakeQuantize per part (the per-op profile of the demo model).
    Returns the number of tensors rewritten."""
    constants_to_initializers(model)
    inits = _initializers(model)
    consumers = defaultdict(list)
    for node in model.graph.node:
        for t in node.input:
            consumers[t].append(node)
    graph_outputs = {o.name for o in model.graph.output}
    drop, new_nodes, n = set(), [], 0
    for tensor in list(consumers):
        cutters = [c for c in consumers[tensor] if c.op_type in ("Slice", "Split") and c.input[0] == tensor]
        if not cutters or tensor in inits:
            continue
        pairs, params = [], None  # [(cutter output, Q, [DQ])]
        ok = True
        for c in cutters:
            for out in c.output:
                users = consumers.get(out, [])
                if len(users) != 1 or users[0].op_type != "QuantizeLinear" or out in graph_outputs:
                    ok = False
                    break
                q = users[0]
                dqs = consumers.get(q.output[0], [])
                p = _qdq_params(q, inits)
                if not dqs or any(d.op_type != "DequantizeLinear" or not _same_params(_qdq_params(d, inits), p)
                                  or d.output[0] in graph_outputs for d in dqs) or q.output[0] in graph_outputs:
                    ok = False
                    break
                if params is not None and not _same_params(params, p):
                    ok = False
                    break
                params = p
                pairs.append((out, q, dqs))
            if not ok:
                break
        if not ok or not pairs or params[0].size != 1:  # per-tensor activation scales only
            continue
        q0, dq0 = pairs[0][1], pairs[0][2][0]
        q_out, dq_out = f"{tensor}_qat_cut_q", f"{tensor}_qat_cut_dq"
        new_nodes.append((cutters[0], [onnx.helper.make_node("QuantizeLinear", [tensor, *q0.input[1:]], [q_out],
                                                             name=f"{q0.name}_before_cut"),
                                       onnx.helper.make_node("DequantizeLinear", [q_out, *dq0.input[1:]], [dq_out],
                                                             name=f"{dq0.name}_before_cut")]))
        for c in cutters:
            c.input[0] = dq_out
        for out, q, dqs in pairs:  # readers of each old DQ read the cut part directly
            drop.add(id(q))
            for d in dqs:
                drop.add(id(d))
                for node in consumers.get(d.output[0], []):
                    for i, t in enumerate(node.input):
                        if t == d.output[0]:
                            node.input[i] = out
        n += 1
    if not n:
        return 0
    before = {id(c): nodes for c, nodes in new_nodes}
    kept = []
    for node in model.graph.node:  # new pairs go right before the first cutter: the order stays topological
        kept += before.get(id(node), [])
        if id(node) not in drop:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return n
