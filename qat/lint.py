"""Check a Q/DQ ONNX against the TensorRT rules (DESIGN.md sections 2 and 4); list every violation.

    python -m qat.lint model.onnx [--float-layers 'model\\.22\\.' ...]   # exit 1 with the list, 0 when clean

Checks: int8 symmetric zero points (int8, all 0); per-tensor activation scales; per-output-channel
weight scales (axis 0, one per output channel); Q and DQ of a pair carry the same positive scale;
one scale in every shared-scale group (`qat.graph.scale_classes`: Concat / Add / MaxPool / Resize /
Split groups, Add chains and duplicate Q/DQ on one tensor); every convolution quantized on both
input and weight or on neither, the float ones read from the graph (never from the exporter's
metadata) and, when the expected float layers are given (--float-layers, --no-last-layer, or the
checkpoint's settings with --weights), exactly those; no dangling nodes (outputs nobody reads, Q
without DQ, DQ without Q, float-to-float Casts left behind).
"""
import argparse
import re

import numpy as np

from qat.compat import UserError, run_cli
from qat.graph import (is_float_cast, find_pairs, import_graph, load_model, metadata, scale_classes)

# The DFL's fixed 1x1 convolution (the box-decoding integral) is float by design in every model.
ALWAYS_FLOAT = (r"\.dfl\d*\.conv$",)


def module_name(node):
    """The PyTorch module path of an exported node: from its weight's initializer name when it has
    one ('model.22.cv2.0.0.conv.weight'), else from the node's scope name
    ('/model.22/cv2.0/cv2.0.0/conv/Conv' -> 'model.22.cv2.0.0.conv')."""
    if node.op == "Conv" and len(node.inputs) > 1:
        w = node.inputs[1]
        src = w.inputs[0] if getattr(w, "inputs", None) else None  # DQ producing the weight
        if src is not None and src.op == "DequantizeLinear":
            q = src.inputs[0].inputs[0] if src.inputs[0].inputs else None
            w = q.inputs[0] if q is not None and q.op == "QuantizeLinear" else src.inputs[0]
        if w.name.endswith(".weight"):
            return w.name[: -len(".weight")]
    parts = []
    for comp in (node.name or "").strip("/").split("/")[:-1]:
        if parts and comp.startswith(parts[-1] + "."):
            parts[-1] = comp
        else:
            parts.append(comp)
    return ".".join(parts)


def matches(name, patterns):
    return any(re.search(p, name) for p in patterns)


def _dq_of(t):
    """The DequantizeLinear producing tensor t (or None)."""
    prod = t.inputs[0] if getattr(t, "inputs", None) else None
    return prod if prod is not None and prod.op == "DequantizeLinear" else None


def _fmt_scale(s):
    s = np.asarray(s).reshape(-1)
    return f"{s[0]:.6g}" if s.size == 1 else f"[{s.size} values]"


def _zero_point_violations(nodes):
    """Zero points: int8, all zero (TensorRT: symmetric signed INT8)."""
    v = []
    for n in nodes:
        zp = n.inputs[2] if len(n.inputs) > 2 else None
        vals = getattr(zp, "values", None)
        if zp is None or vals is None:
            v.append(f"{n.name}: no zero point (defaults to uint8); TensorRT needs an int8 zero point of 0")
            continue
        vals = np.asarray(vals)
        if vals.dtype != np.int8 or np.any(vals != 0):
            v.append(f"{n.name}: zero point {vals.dtype} {vals.reshape(-1)[:4].tolist()}; "
                     f"TensorRT needs int8 zero point 0 (symmetric)")
    return v


def _pair_violations(pairs, qs, dqs):
    """Q/DQ pairs: matching positive scales, per-channel weights on axis 0, per-tensor activations; no
    dangling Q or DQ."""
    v = []
    paired_q = {id(p.q) for p in pairs}
    paired_dq = {id(p.dq) for p in pairs}
    for n in qs:
        if id(n) not in paired_q:
            v.append(f"{n.name}: QuantizeLinear not followed by a DequantizeLinear (dangling)")
    for n in dqs:
        if id(n) not in paired_dq and getattr(n.inputs[0], "values", None) is None:
            v.append(f"{n.name}: DequantizeLinear without a QuantizeLinear before it (dangling)")
    for p in pairs:
        s_q, s_dq = np.asarray(p.scale), np.asarray(getattr(p.dq.inputs[1], "values", np.nan))
        if s_q.shape != s_dq.shape or not np.allclose(s_q, s_dq, rtol=1e-6, atol=0):
            v.append(f"{p.name}: Q scale {_fmt_scale(s_q)} and DQ scale {_fmt_scale(s_dq)} differ")
        if not np.all(np.isfinite(s_q)) or np.any(s_q <= 0):
            v.append(f"{p.name}: scale {_fmt_scale(s_q)} is not positive and finite")
        consumers = list(p.dq.outputs[0].outputs)
        if p.weight:
            w = np.asarray(p.source.values)
            convs = [c for c in consumers if c.op == "Conv" and len(c.inputs) > 1 and c.inputs[1] is p.dq.outputs[0]]
            if convs:
                if s_q.ndim == 0 or (s_q.size == 1 and w.shape[0] != 1):
                    v.append(f"{p.name}: per-tensor weight scale; TensorRT expects per-output-channel (axis 0)")
                elif (p.axis if p.axis is not None else 1) != 0 or s_q.ndim != 1 or s_q.size != w.shape[0]:
                    v.append(f"{p.name}: weight scale of {s_q.size} values on axis {p.axis}; "
                             f"expected {w.shape[0]} on axis 0 (per output channel)")
        elif s_q.size != 1:
            v.append(f"{p.name}: activation scale has {s_q.size} values; activations are per-tensor")
    return v


def _float_conv_violations(graph, patterns):
    """Float convolutions, read from the graph; compared with the expected ones (`patterns`) when given."""
    v = []
    for n in graph.nodes:
        if n.op != "Conv" or matches(module_name(n), ALWAYS_FLOAT):
            continue
        name = module_name(n)
        q_in, q_w = _dq_of(n.inputs[0]) is not None, len(n.inputs) > 1 and _dq_of(n.inputs[1]) is not None
        if q_in != q_w:
            v.append(f"{n.name}: convolution {name} has Q/DQ on its {'input' if q_in else 'weight'} only "
                     f"(TensorRT runs it in float; quantize both or neither)")
        elif patterns is not None and matches(name, patterns) and q_in:
            v.append(f"{n.name}: Q/DQ on layer {name}, which should stay float")
        elif patterns is not None and not matches(name, patterns) and not q_in:
            v.append(f"{n.name}: convolution {name} runs in float (no Q/DQ on input and weight) but is not "
                     f"one of the float layers {patterns}")
    return v


def lint(onnx_path, float_layers=None, expect_qdq=True):
    """Return the list of violations (empty when the file follows every rule).

    Which convolutions run in float is read from the graph (no Q/DQ on input and weight), never from
    the file's metadata (the exporter's own claim). float_layers: when given (a list of regexes,
    re.search on module names, e.g. from the checkpoint's settings), the float convolutions of the
    graph must be exactly those: [] means every convolution must be INT8. None: no such comparison;
    a convolution quantized on only one of input and weight is always a violation."""
    model = load_model(onnx_path)
    patterns = None if float_layers is None else list(float_layers)
    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"float layer pattern '{p}' is not a valid regular expression ({e})") from None
    graph = import_graph(model)
    v = []

    qs = [n for n in graph.nodes if n.op == "QuantizeLinear"]
    dqs = [n for n in graph.nodes if n.op == "DequantizeLinear"]
    if not qs and not dqs:
        return ["no QuantizeLinear/DequantizeLinear nodes: a float model, not a QAT export"] if expect_qdq else []

    pairs = find_pairs(graph)
    v += _zero_point_violations(qs + dqs) + _pair_violations(pairs, qs, dqs)

    # one scale per group
    for c in scale_classes(graph, pairs):
        if not c.agrees():
            where = f" at {', '.join(c.ops[:3])}" if c.ops else ""
            members = ", ".join(f"{p.name} (amax {p.amax:.6g})" for p in c.pairs[:6])
            more = f" and {len(c.pairs) - 6} more" if len(c.pairs) > 6 else ""
            v.append(f"scale mismatch in a shared group{where}: {members}{more}; run qat.graph.postprocess "
                     f"or train with the qat rules")

    v += _float_conv_violations(graph, patterns)

    # residual Adds follow the file's --residual-quant placement
    v += _residual_violations(graph, metadata(model).get("residual_quant") or "both", patterns)

    # dangling nodes and leftovers
    outputs = set(id(t) for t in graph.outputs)
    for n in graph.nodes:
        if n.outputs and all(not t.outputs and id(t) not in outputs for t in n.outputs):
            v.append(f"{n.name or n.op}: {n.op} output is never used (dangling node)")
        if is_float_cast(n):
            v.append(f"{n.name}: float-to-float Cast left in the graph (qat.graph.postprocess removes it)")
    return v


def _residual_violations(graph, placement, float_patterns):
    """'both': an Add fed by one DequantizeLinear must be fed by two (one unquantized input splits the
    group). 'shortcut': the unquantized input of such an Add must come straight from a convolution
    (its Conv or the activation right after it) so TensorRT can fuse the Add into that convolution."""
    v = []
    for n in graph.nodes:
        if n.op != "Add" or len(n.inputs) != 2 or matches(module_name(n), float_patterns or []):
            continue
        fed = [_dq_of(t) is not None for t in n.inputs]
        if sum(fed) != 1:
            continue
        other = n.inputs[fed.index(False)]
        if getattr(other, "inputs", None) and other.inputs[0].op in ("Add", "Sum"):
            continue  # a chain of addends (CBFuse: (a + b) + c): its inputs are checked at the first Add
        if placement == "both":
            v.append(f"{n.name}: residual Add with only one quantized input; --residual-quant both quantizes both")
            continue
        prod = other.inputs[0] if getattr(other, "inputs", None) else None
        if prod is not None and prod.op == "Mul":  # SiLU = x * sigmoid(x): look through to its input
            prod = next((t.inputs[0] for t in prod.inputs if getattr(t, "inputs", None) and t.inputs[0].op == "Conv"),
                        prod)
        if prod is None or prod.op != "Conv":
            v.append(f"{n.name}: the unquantized input of the residual Add does not come from a convolution "
                     f"({prod.op if prod is not None else 'graph input'}); TensorRT cannot fuse it")
    return v


def summary(onnx_path):
    """Counts for a clean file: Q/DQ pairs, groups, INT8 / float convolutions, and the module names
    of the float ones (from the graph)."""
    graph = import_graph(onnx_path)
    pairs = find_pairs(graph)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    int8 = [_dq_of(n.inputs[0]) is not None and _dq_of(n.inputs[1]) is not None for n in convs]
    return {"pairs": len(pairs), "groups": len(scale_classes(graph, pairs)), "convs": len(convs),
            "int8_convs": sum(int8), "float_layers": [module_name(n) for n, q in zip(convs, int8) if not q]}


def checkpoint_float_layers(weights):
    """The float-layer patterns a QAT checkpoint's settings give (skipped layers, --no-last-layer head,
    quantizers disabled by calibration)."""
    from qat.checkpoint import load_qat
    from qat.export import float_layers

    model, _, _ = load_qat(weights)
    return float_layers(model)


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qat.lint",
                                     description="Check a Q/DQ ONNX against the TensorRT Q/DQ rules")
    parser.add_argument("onnx", help="ONNX model to check")
    parser.add_argument("--float-layers", nargs="*", default=None,
                        help="regexes of the module names that must be float; every other conv must be INT8")
    parser.add_argument("--no-last-layer", action="store_true", help="the detection head must stay float")
    parser.add_argument("--weights", default=None,
                        help="QAT checkpoint the file was exported from: its settings say which layers are float")
    return parser.parse_args(argv)


def main(argv=None):
    def _main():
        opt = parse_opt(argv)
        patterns = None if opt.float_layers is None else list(opt.float_layers)
        if opt.no_last_layer:
            head = metadata(opt.onnx).get("head")
            if not head:
                raise UserError(f"{opt.onnx} does not record its head layer; pass --float-layers 'model\\.N\\.'")
            patterns = (patterns or []) + [re.escape(head) + r"\."]
        if opt.weights:
            patterns = (patterns or []) + checkpoint_float_layers(opt.weights)
        violations = lint(opt.onnx, float_layers=patterns)
        if violations:
            for line in violations:
                print(f"violation: {line}")
            print(f"{opt.onnx}: {len(violations)} violation(s)")
            return 1
        s = summary(opt.onnx)
        print(f"{opt.onnx}: ok ({s['pairs']} Q/DQ pairs, {s['groups']} shared-scale groups, "
              f"{s['int8_convs']}/{s['convs']} convolutions INT8)")
        if s["float_layers"]:
            print(f"float in the graph: {', '.join(s['float_layers'][:20])}"
                  + (f" and {len(s['float_layers']) - 20} more" if len(s["float_layers"]) > 20 else ""))
        return 0

    raise SystemExit(run_cli(_main))


if __name__ == "__main__":
    main()
