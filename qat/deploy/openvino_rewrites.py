"""Rewrites of a copy of a Q/DQ graph for OpenVINO's CPU plugin (DESIGN.md section 5); the
TensorRT-shaped file stays as it is. Lossless except `requantize_weights` (7-bit weights for CPUs
without VNNI / AMX, where 8-bit ones saturate) and `zero_point_free_convs` (equal up to float rounding
of a bias). Over 300 lines: each rewrite serves the one runtime and they share the Q/DQ readers."""
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

SHIFT_OPS = ("Slice", "Split", "MaxPool", "Concat")  # f(x + c) = f(x) + c: the shift passes through them


def _attr(node, name, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _scalar(inits, name):
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _conv_weight(conv, inits, producers):
    """The float weight a Conv computes with (its Q/DQ-quantized initializer, dequantized as ONNX does), or None."""
    dq = producers.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
        return None
    if dq.input[0] in inits:
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    else:
        qn = producers.get(dq.input[0])
        if qn is None or qn.op_type != "QuantizeLinear" or qn.input[0] not in inits or qn.input[1] not in inits:
            return None
        w = numpy_helper.to_array(inits[qn.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[qn.input[1]]).astype(np.float32)
        zp = _scalar(inits, qn.input[2]) if len(qn.input) > 2 and qn.input[2] else np.zeros((), np.int8)
        if zp is None:
            return None
        shape = [-1] + [1] * (w.ndim - 1) if s.size > 1 else []
        lo, hi = (0, 255) if zp.dtype == np.uint8 else (-128, 127)
        q = np.clip(np.rint(w / s.reshape(shape)) + zp.astype(np.float32).reshape(shape), lo, hi).astype(np.float64)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = _scalar(inits, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(())
    if zp is None:
        return None
    shape = [-1] + [1] * (q.ndim - 1) if s.size > 1 else []
    return (q - zp.astype(np.float64).reshape(shape)) * s.reshape(shape)


def zero_point_free_convs(model):
    """Feed the convolutions of the uint8 form (zero point 128, `activations_to_uint8`) the same uint8
    values with zero point 0, in place: the dequantized input becomes x + 128*s, and the constant
    128*s*sum(W) per output channel comes off the bias; a padded convolution gets its padding from a Pad
    node that pads the uint8 data with 128 (the zero point: 0 before the shift). Slice/Split/MaxPool/
    Concat pass the shift on, and a requantizer with the same scale reads shifted data with zero point 0
    (same integers). Any other reader (the residual Add, the head) keeps the zero point 128 form, and so
    does a padded convolution that reads a cut (Slice/Split) of a quantized tensor (the Pad needs the
    uint8 data before the DQ).

    Why: oneDNN's brgemm INT8 convolutions (AVX512-VNNI, AVX2) handle a source zero point with a
    compensation pass on every call: about 15 us per convolution on the AMD EPYC here, so the uint8
    form's convolutions took longer than bf16 ones on the demo model at batch 1 (6.2 vs 5.5 ms;
    4.8 ms with zero point 0). Not bit-exact: the compensation is a float bias here where oneDNN adds
    it in int32, so an output can differ in its last float bits (and a requantized value by one step),
    as OpenVINO already differs from ONNX Runtime. Returns the number of convolutions rewritten."""
    constants_to_initializers(model)
    g = model.graph
    inits = _initializers(model)
    producers = {o: n for n in g.node for o in n.output}
    consumers = defaultdict(list)
    for n in g.node:
        for t in n.input:
            consumers[t].append(n)
    graph_outputs = {o.name for o in g.output}

    def shifted_dq_scale(t):
        """Scale of an activation DQ output in the uint8 form (zero point 128), else None."""
        n = producers.get(t)
        if n is None or n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] in inits:
            return None
        q = producers.get(n.input[0])
        s, zp = _scalar(inits, n.input[1]), _scalar(inits, n.input[2])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits or s is None or zp is None:
            return None
        return float(s.reshape(-1)[0]) if s.size == 1 and zp.dtype == np.uint8 and zp.size == 1 and int(zp) == 128 \
            else None

    def data_inputs(n):
        return list(n.input) if n.op_type == "Concat" else [n.input[0]]

    scale = {}  # tensors that can carry the shift: uint8-form DQ outputs, and what SHIFT_OPS make of them
    for n in g.node:
        s = shifted_dq_scale(n.output[0]) if n.op_type == "DequantizeLinear" else None
        if s is not None:
            scale[n.output[0]] = s
        elif n.op_type in SHIFT_OPS and len(n.output) >= 1 and not (n.op_type == "MaxPool" and len(n.output) > 1):
            ss = [scale.get(i) for i in data_inputs(n)]
            if ss and all(x is not None and x == ss[0] for x in ss):
                for o in n.output:
                    scale[o] = ss[0]
    is_dq = lambda t: producers.get(t) is not None and producers[t].op_type == "DequantizeLinear"  # noqa: E731

    def requantizer(t, n):  # a Q of t with t's scale and zero point 128: reads t + 128*s with zero point 0
        if n.op_type != "QuantizeLinear" or n.input[0] != t or len(n.input) < 3:
            return False
        s, zp = _scalar(inits, n.input[1]), _scalar(inits, n.input[2])
        return s is not None and zp is not None and s.size == 1 and zp.dtype == np.uint8 and zp.size == 1 \
            and int(zp) == 128 and float(s.reshape(-1)[0]) == scale[t]

    def conv_takes(t, n):
        if n.op_type != "Conv" or n.input[0] != t or _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return False
        if len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
            return False
        if any(_attr(n, "pads", [])) and not is_dq(t):  # the Pad goes on the uint8 data before the DQ
            return False
        return _conv_weight(n, inits, producers) is not None

    kept = {t for t in scale if not is_dq(t)}  # shifted as a whole: every reader must take the shift

    def edge_ok(t, n):
        if requantizer(t, n) or conv_takes(t, n):
            return True
        if n.op_type in SHIFT_OPS and t in data_inputs(n) and all(o in kept for o in n.output):
            return all(i in scale and (is_dq(i) or i in kept) for i in data_inputs(n))
        return False

    changed = True
    while changed:  # the largest set closed under "every reader takes the shift" (a Concat ties its inputs)
        changed = False
        for t in list(kept):
            if t in graph_outputs or not consumers.get(t) or not all(edge_ok(t, c) for c in consumers[t]) or \
                    not all(is_dq(i) or i in kept for i in data_inputs(producers[t])):
                kept.discard(t)
                changed = True

    zp0 = "qat_activation_zero_point_u8_0"
    if zp0 not in inits:
        inits[zp0] = numpy_helper.from_array(np.array(0, dtype=np.uint8), zp0)
        g.initializer.append(inits[zp0])
    after, before = defaultdict(list), defaultdict(list)
    shifted = set()
    plan = [(producers[t], t, [n for n in consumers[t] if edge_ok(t, n)]) for t in scale if is_dq(t)]
    for dq, t, takers in plan:
        if not takers:
            continue
        if len(takers) == len(consumers[t]) and t not in graph_outputs:
            dq.input[2] = zp0
            shifted.add(t)
            continue
        t0 = f"{t}_zp0"
        producers[t0] = onnx.helper.make_node("DequantizeLinear", [dq.input[0], dq.input[1], zp0], [t0],
                                              name=f"{dq.name or t}_zp0")
        after[id(dq)].append(producers[t0])
        shifted.add(t0)
        scale[t0] = scale[t]
        for n in takers:
            for i, x in enumerate(n.input):
                if x == t:
                    n.input[i] = t0
    shifted |= kept
    n_convs = 0
    for n in list(g.node):
        if n.op_type == "QuantizeLinear" and n.input[0] in shifted:
            n.input[2] = zp0
        if n.op_type != "Conv" or n.input[0] not in shifted:
            continue
        c = 128.0 * scale[n.input[0]]
        w = _conv_weight(n, inits, producers)
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64) if len(n.input) > 2 and n.input[2] \
            else np.zeros(w.shape[0])
        label = n.name or n.output[0]
        name = f"{label}_bias_zp0"
        inits[name] = numpy_helper.from_array((bias - c * w.reshape(w.shape[0], -1).sum(1)).astype(np.float32), name)
        g.initializer.append(inits[name])
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = name
        pads = list(_attr(n, "pads", []))
        if any(pads):
            dq = producers[n.input[0]]
            k = len(pads) // 2
            p_name, v_name, padded = f"{label}_pads", f"{label}_pad_value", f"{dq.input[0]}_pad_{label}"
            inits[p_name] = numpy_helper.from_array(np.array([0, 0] + pads[:k] + [0, 0] + pads[k:], np.int64), p_name)
            inits[v_name] = numpy_helper.from_array(np.array(128, np.uint8), v_name)
            g.initializer.extend([inits[p_name], inits[v_name]])
            before[id(n)] += [onnx.helper.make_node("Pad", [dq.input[0], p_name, v_name], [padded], mode="constant",
                                                    name=f"{label}_pad_zero_point"),
                              onnx.helper.make_node("DequantizeLinear", [padded, dq.input[1], zp0], [f"{padded}_dq"],
                                                    name=f"{label}_pad_zero_point_dq")]
            n.input[0] = f"{padded}_dq"
            next(a for a in n.attribute if a.name == "pads").ints[:] = [0] * len(pads)
        n_convs += 1
    nodes = []
    for n in g.node:
        nodes += before.get(id(n), []) + [n] + after.get(id(n), [])
    del g.node[:]
    g.node.extend(nodes)
    return n_convs
