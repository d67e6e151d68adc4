"""The ONNX post-process of DESIGN.md section 4, and the analysis `qat.lint` checks with.

    report = postprocess("model.onnx")          # in place (or out=...); print(format_report(report))

The exported graph is walked with onnx-graphsurgeon. Tensors that TensorRT can keep in INT8 between
layers only with one scale fall into classes (the same three rules as `qat.rules` on the torch side):
- a Split / Slice / Reshape / Transpose / MaxPool / Resize (Upsample) / Identity / Cast output and
  its input (these ops commute with quantization; TensorRT moves Q/DQ across them);
- all inputs of a Concat and its output;
- both inputs of an elementwise Add (the residual shortcut, CBFuse), and a partial sum that only
  feeds another Add with them (an Add chain: CBFuse's 3+ addends share one scale, as in qat.rules);
and a QuantizeLinear -> DequantizeLinear pair joins its input and output. Every activation Q/DQ pair
whose tensor falls into a class with other pairs must carry the class's one scale.

The pass then
1. folds the Constant nodes into initializers and the Identity nodes of the exporter away,
2. removes the float-to-float Cast nodes modelopt leaves on quantizer inputs,
   and writes a one-output-channel weight's scalar scale as per-channel (axis 0),
3. unifies the scale of every class (largest amax wins; a model trained with qat.rules already has
   one scale per class, so nothing changes and the report says so),
4. merges Q/DQ pairs that quantize one tensor with one scale into one pair,
5. removes dead nodes.

The OpenVINO-only rewrites of a copy of the graph (uint8 activations, 7-bit weights) live in
`qat.deploy.openvino`.

Over 300 lines: the analysis (scale classes) and the post-process built on it use the same pair
and class objects; qat.lint imports the analysis.
"""
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qat.compat import UserError
from qat.rules import UnionFind

PRESERVE_OPS = {"Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Resize",
                "Upsample", "Identity", "Cast", "Pad"}  # output carries its (first) input's scale
JOIN_OPS = {"Concat"}  # inputs and output: one class
ADD_OPS = {"Add", "Sum"}  # inputs: one class
GROUP_OPS = {"Concat", "Add", "Sum", "MaxPool", "Resize", "Upsample", "Split", "Slice"}  # reported as group points
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
RTOL = 1e-6  # two scales "agree" within float32 rounding


def _gs():
    import onnx_graphsurgeon as gs
    return gs


# --------------------------------------------------------------------------------------------------
# Loading


def load_model(path_or_model):
    """An onnx.ModelProto from a path or a ModelProto (copied), with a clear error for bad files."""
    if isinstance(path_or_model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(path_or_model)
        return m
    path = Path(path_or_model)
    if not path.is_file():
        raise UserError(f"ONNX file '{path}' not found; check the path")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"'{path}' is not a readable ONNX model ({type(e).__name__}); re-export it") from None


def constants_to_initializers(model):
    """Constant nodes (what torch.onnx writes for scales and zero points) -> initializers, in place.
    Makes every scale an initializer that both analysis and rewrites can read and replace."""
    g = model.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name in ("value", "value_float",
                                                                                      "value_floats", "value_int",
                                                                                      "value_ints"):
            a = n.attribute[0]
            if a.name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(a.t)
            else:
                dtype = np.float32 if "float" in a.name else np.int64
                t = numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a), dtype=dtype))
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    return model


def import_graph(path_or_model):
    """A graphsurgeon Graph with Constant nodes folded into constants and dtypes inferred."""
    model = constants_to_initializers(load_model(path_or_model))
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops (TRT plugins) can stop inference; dtypes then stay partly unknown
        pass
    return _gs().import_onnx(model)


# --------------------------------------------------------------------------------------------------
# Q/DQ pairs and scale classes


@dataclass
class QDQPair:
    q: object  # gs.Node QuantizeLinear
    dq: object  # gs.Node DequantizeLinear
    source: object  # gs.Tensor quantized (the Q input)
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int | None
    weight: bool  # source is a constant (weight) rather than an activation

    @property
    def name(self):
        return self.q.name or self.q.outputs[0].name

    @property
    def amax(self):
        return float(np.max(self.scale)) * 127.0


def _const_values(t):
    gs = _gs()
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def _is_const(t):
    return _const_values(t) is not None


def find_pairs(graph):
    """Every QuantizeLinear followed by DequantizeLinear (each DQ consumer of a Q is one pair)."""
    pairs = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear":
            continue
        for dq in list(q.outputs[0].outputs):
            if dq.op != "DequantizeLinear":
                continue
            scale = _const_values(q.inputs[1])
            zp = _const_values(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
            pairs.append(QDQPair(q, dq, q.inputs[0], scale if scale is not None else np.array(np.nan),
                                 zp, q.attrs.get("axis"), _is_const(q.inputs[0])))
    return pairs


def is_float_cast(node):
    """A Cast to a float type whose input is a float tensor of that same type (a no-op)."""
    if node.op != "Cast":
        return False
    to = node.attrs.get("to")
    src = node.inputs[0]
    src_dtype = getattr(src, "dtype", None)
    try:
        src_onnx = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(src_dtype)) if src_dtype is not None else None
    except (TypeError, KeyError):
        src_onnx = None
    return to in FLOAT_TYPES and src_onnx == to


@dataclass
class ScaleClass:
    ops: list = field(default_factory=list)  # names of the Concat/Add/MaxPool/Resize/Split/Slice nodes in it
    pairs: list = field(default_factory=list)  # activation QDQPairs

    def scales(self):
        return [float(np.asarray(p.scale).reshape(-1)[0]) for p in self.pairs]

    def agrees(self):
        s = self.scales()
        return not s or (max(s) - min(s)) <= RTOL * max(abs(max(s)), 1e-30)


def scale_classes(graph, pairs=None):
    """Classes of tensors that must share a scale (see module doc), with their activation Q/DQ
    pairs; only classes holding at least two pairs are returned, in graph order."""
    gs = _gs()
    pairs = find_pairs(graph) if pairs is None else pairs
    uf = UnionFind()
    variables = lambda ts: [t for t in ts if isinstance(t, gs.Variable)]  # noqa: E731
    group_ops = defaultdict(list)
    for n in graph.nodes:
        ins, outs = variables(n.inputs), variables(n.outputs)
        if n.op in PRESERVE_OPS and ins and (n.op != "Cast" or is_float_cast(n)):
            for t in outs:
                uf.union(ins[0].name, t.name)
        elif n.op in JOIN_OPS and ins:
            for t in ins[1:] + outs:
                uf.union(ins[0].name, t.name)
        elif n.op in ADD_OPS and len(ins) >= 2:
            for t in ins[1:]:
                uf.union(ins[0].name, t.name)
            if outs and outs[0].outputs and all(c.op in ADD_OPS for c in outs[0].outputs) \
                    and outs[0] not in graph.outputs:
                uf.union(ins[0].name, outs[0].name)  # a partial sum (CBFuse, 3+ addends): the chain is one class
        if n.op in GROUP_OPS and ins:
            group_ops[ins[0].name].append(n.name)
    for p in pairs:
        if not p.weight:
            uf.union(p.source.name, p.dq.outputs[0].name)
    classes = {}
    for p in pairs:
        if p.weight or np.asarray(p.scale).size != 1:
            continue
        classes.setdefault(uf.find(p.source.name), ScaleClass()).pairs.append(p)
    for tensor_name, ops in group_ops.items():
        key = uf.find(tensor_name)
        if key in classes:
            classes[key].ops += ops
    return [c for c in classes.values() if len(c.pairs) > 1]


# --------------------------------------------------------------------------------------------------
# The post-process


def _bypass(graph, node, keep_output_name=True):
    """Remove a one-input one-output node: its consumers read its input instead. A node whose output
    is a graph output is kept (renaming graph outputs would break the file's contract)."""
    src, out = node.inputs[0], node.outputs[0]
    if out in graph.outputs:
        return False
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = src
    node.outputs.clear()
    node.inputs.clear()
    return True


def remove_float_casts(graph):
    n = 0
    for node in list(graph.nodes):
        if is_float_cast(node) and _bypass(graph, node):
            n += 1
    return n


def fold_identities(graph):
    n = 0
    for node in list(graph.nodes):
        if node.op == "Identity" and node.inputs and _bypass(graph, node):
            n += 1
    return n


def _set_scale(pair, value):
    """Give a pair a new per-tensor scale (new constants: the old ones may be shared)."""
    gs = _gs()
    dtype = np.asarray(pair.scale).dtype
    for node in (pair.q, pair.dq):
        node.inputs[1] = gs.Constant(f"{node.name or node.outputs[0].name}_scale_unified",
                                     np.array(value, dtype=dtype).reshape(np.asarray(pair.scale).shape))
    pair.scale = np.array(value, dtype=dtype).reshape(np.asarray(pair.scale).shape)


def unify_scales(graph, classes):
    """Every class to one scale, the largest (largest amax wins). Returns [(pair name, old, new)]."""
    changes = []
    for c in classes:
        if c.agrees():
            continue
        new = max(c.scales())
        for p, old in zip(c.pairs, c.scales()):
            if abs(old - new) > RTOL * new:
                _set_scale(p, new)
                changes.append((p.name, old * 127.0, new * 127.0))
    return changes


def _pair_key(p):
    zp = None if p.zero_point is None else (p.zero_point.dtype.str, p.zero_point.tobytes())
    return (np.asarray(p.scale).dtype.str, np.asarray(p.scale).tobytes(), zp, p.axis)


def merge_duplicate_pairs(graph, pairs):
    """Pairs that quantize the same tensor with the same scale, zero point and axis -> one pair."""
    merged = 0
    first = {}
    for p in pairs:
        key = (id(p.source), _pair_key(p))
        if key not in first:
            first[key] = p
            continue
        keep, out = first[key].dq.outputs[0], p.dq.outputs[0]
        if out in graph.outputs or keep is out:
            continue
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = keep
        merged += 1
    return merged


def per_channel_single_output_weights(graph, pairs):
    """Weight Q/DQ pairs of a one-output-channel weight (a single-class head's class conv) exported
    with a scalar scale -> the same scale as one value on axis 0. Per-tensor and per-channel are the
    same numbers there, but TensorRT (and qat.lint) expect weights per output channel, axis 0.
    Returns the number of pairs rewritten."""
    gs = _gs()
    n = 0
    for p in pairs:
        w = _const_values(p.source)
        if not p.weight or w is None or w.ndim < 2 or w.shape[0] != 1 or np.asarray(p.scale).ndim != 0:
            continue
        for node in (p.q, p.dq):
            for i in (1, 2):
                v = _const_values(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
                if v is not None and v.ndim == 0:
                    node.inputs[i] = gs.Constant(f"{node.inputs[i].name}_axis0", v.reshape(1))
            node.attrs["axis"] = 0
        p.scale, p.axis = np.asarray(p.scale).reshape(1), 0
        n += 1
    return n


def qdq_counts(graph_or_model):
    """{'QuantizeLinear': n, 'DequantizeLinear': n} of a gs Graph or an onnx model/path."""
    if isinstance(graph_or_model, (str, Path, onnx.ModelProto)):
        nodes = [n.op_type for n in load_model(graph_or_model).graph.node]
    else:
        nodes = [n.op for n in graph_or_model.nodes]
    return {op: nodes.count(op) for op in QDQ_OPS}


def postprocess(onnx_path, out=None, unify=True):
    """Run the pass on `onnx_path` and write the result to `out` (default: in place).

    Returns the report dict: nodes_before/after, constants_folded, identities_removed,
    casts_removed, weights_made_per_channel, scale_changes [(pair, old amax, new amax)], duplicates_merged, dead_removed,
    groups (classes with >= 2 pairs), groups_agreeing (before the pass), qdq (counts after)."""
    gs = _gs()
    model = load_model(onnx_path)
    n_const = sum(n.op_type == "Constant" for n in model.graph.node)
    nodes_before = len(model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    graph = import_graph(model)

    nodes0 = len(graph.nodes)
    identities = fold_identities(graph)
    casts = remove_float_casts(graph)
    graph.cleanup()
    dead = nodes0 - len(graph.nodes) - identities - casts
    pairs = find_pairs(graph)
    per_channel = per_channel_single_output_weights(graph, pairs)
    classes = scale_classes(graph, pairs)
    agreeing = sum(c.agrees() for c in classes)
    changes = unify_scales(graph, classes) if unify else []
    merged = merge_duplicate_pairs(graph, pairs)
    n_before_cleanup = len(graph.nodes)
    graph.cleanup().toposort()
    dead += n_before_cleanup - len(graph.nodes) - 2 * merged

    out_model = gs.export_onnx(graph)
    out_model.ir_version = model.ir_version
    del out_model.opset_import[:]
    out_model.opset_import.extend(model.opset_import)
    for k, v in meta.items():
        out_model.metadata_props.add(key=k, value=v)
    report = {"nodes_before": nodes_before, "nodes_after": len(out_model.graph.node), "constants_folded": n_const,
              "identities_removed": identities, "casts_removed": casts, "weights_made_per_channel": per_channel,
              "scale_changes": [(n, float(a), float(b)) for n, a, b in changes], "duplicates_merged": merged,
              "dead_removed": max(dead, 0), "groups": len(classes), "groups_agreeing": agreeing,
              "qdq": qdq_counts(graph)}
    save_onnx(out_model, out or onnx_path)
    return report


def save_onnx(model, path):
    """Save atomically: a reader never sees half a model."""
    from qat.compat import atomic_output

    with atomic_output(path) as tmp:
        onnx.save(model, tmp)
    return Path(path)


def format_report(r):
    """The report as a few human lines."""
    lines = [f"graph: {r['nodes_before']} -> {r['nodes_after']} nodes "
             f"({r['constants_folded']} constants folded, {r['identities_removed']} identities, "
             f"{r['casts_removed']} float-to-float casts, {r['duplicates_merged']} duplicate Q/DQ pairs merged, "
             f"{r['dead_removed']} dead nodes removed"
             + (f", {r['weights_made_per_channel']} one-channel weight scale(s) put on axis 0" if r.get(
                 "weights_made_per_channel") else "") + ")",
             f"graph: {r['groups']} shared-scale groups, {r['groups_agreeing']} already on one scale; "
             f"{len(r['scale_changes'])} scale(s) changed"]
    for name, old, new in r["scale_changes"][:50]:
        lines.append(f"  scale changed: {name}: amax {old:.6g} -> {new:.6g}")
    if len(r["scale_changes"]) > 50:
        lines.append(f"  ... and {len(r['scale_changes']) - 50} more")
    lines.append(f"graph: {r['qdq']['QuantizeLinear']} QuantizeLinear, {r['qdq']['DequantizeLinear']} DequantizeLinear")
    return "\n".join(lines)


def metadata(path_or_model):
    """The file's metadata_props as a dict (JSON values decoded; Python-literal values of older files too)."""
    model = load_model(path_or_model) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    out = {}
    for p in model.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except (json.JSONDecodeError, TypeError):
            out[p.key] = _python_literal(p.value)
    return out


def _python_literal(value):
    """Older export.py files (and upstream's) store str() of Python values, e.g. names as
    "{0: 'person', ...}": read those as the value (ast.literal_eval runs no code), else the string."""
    import ast

    if value[:1] in "{[(":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return value
