"""Per-layer quantization sensitivity and the smallest float-layer set that meets an mAP budget.

Method: with the whole model quantized and calibrated, take ONE top-level layer (model.model[i])
back to floating point at a time (its quantizers replaced by pass-through ones; the quantizers it
shares with neighbours stay active for them), evaluate, and rank layers by the mAP50-95 this
recovers. `auto_skip` then keeps layers in float in that order, re-evaluating the combination
after each addition, until the quantized mAP50-95 is within `budget` of FP32: a greedy
approximation of the fewest float layers. The result is a `--skip-layers` list for train_qat.py.
"""
import json
import re
from contextlib import contextmanager
from pathlib import Path

from qat.compat import atomic_output
from qat.quantize import disable_slots
from qat.rules import quantizer_slots


def layer_prefix(i):
    return f"model.{i}."


def skip_regex(i):
    return rf"^model\.{i}\."


def skipped_layers(patterns):
    """The top-level layer indices among --skip-layers patterns written by `skip_regex` (others ignored)."""
    return [int(m.group(1)) for p in patterns if (m := re.fullmatch(r"\^model\\\.(\d+)\\\.", p))]


@contextmanager
def layers_in_float(model, layers):
    """Temporarily give every quantization point of the given top-level layers its own disabled quantizer."""
    slots = disable_slots(model, (layer_prefix(i) for i in layers))
    try:
        yield len(slots)
    finally:
        for parent, attr, q in slots:
            setattr(parent, attr, q)


def quantized_layers(model):
    """Indices of top-level layers that own at least one enabled quantizer."""
    out = []
    for name, _, _, q in quantizer_slots(model):
        if q.is_enabled:
            i = int(name.split(".")[1])
            if i not in out:
                out.append(i)
    return sorted(out)


def layer_sensitivity(model, val_fn, show=True):
    """-> (mAP50-95 of the fully quantized model, rows ranked by recovered mAP50-95, best first).
    val_fn(model) -> {'map', 'map50', ...}."""
    from tqdm import tqdm

    base = val_fn(model)
    rows = []
    for i in tqdm(quantized_layers(model), desc="sensitivity", disable=not show):
        with layers_in_float(model, [i]) as n:
            r = val_fn(model)
        kind = getattr(type(model.model[i]), "FLOAT", None) or type(model.model[i])  # the float class's name
        rows.append({"layer": i, "type": kind.__name__, "points": n, "map": float(r["map"]),
                     "map50": float(r["map50"]), "gain": float(r["map"]) - float(base["map"])})
    rows.sort(key=lambda r: (-r["gain"], r["layer"]))
    return float(base["map"]), rows


def auto_skip(model, ranked, val_fn, fp32_map, budget, base_map=None):
    """Greedy: add layers in ranked order to the float set until mAP50-95 >= fp32_map - budget.
    -> (layer indices, mAP50-95 reached, evaluations [(layers, map)])."""
    target = fp32_map - budget
    current = base_map if base_map is not None else float(val_fn(model)["map"])
    chosen, trail = [], []
    for row in ranked:
        if current >= target:
            break
        chosen.append(row["layer"])
        with layers_in_float(model, chosen):
            current = float(val_fn(model)["map"])
        trail.append((list(chosen), current))
    return chosen, current, trail


def write_sensitivity(save_dir, fp32_map, base_map, ranked, skip=None):
    """`sensitivity.md` and `sensitivity.json` in save_dir."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    data = {"fp32_map": fp32_map, "quantized_map": base_map, "layers": ranked, "auto_skip": skip}
    with atomic_output(save_dir / "sensitivity.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    f = "" if fp32_map is None else f"{fp32_map:.4f}"
    lines = ["# Quantization sensitivity per layer (that layer alone in float)", "",
             f"FP32 mAP50-95 {f}, all layers quantized {base_map:.4f}.", "",
             "| rank | layer | type | quantization points | mAP50-95 | mAP50 | recovered |",
             "|---|---|---|---|---|---|---|"]
    for k, r in enumerate(ranked):
        lines.append(f"| {k + 1} | {r['layer']} | {r['type']} | {r['points']} | {r['map']:.4f} | {r['map50']:.4f} "
                     f"| {r['gain']:+.4f} |")
    if skip is not None:
        use = (f"use `--skip-layers {' '.join(repr(skip_regex(i)) for i in skip['layers'])}`" if skip["layers"]
               else "the fully quantized model already meets the budget")
        lines += ["", f"auto-skip (budget {skip['budget']}): keep layers {skip['layers']} in float -> mAP50-95 "
                      f"{skip['map']:.4f}; {use}"]
    with atomic_output(save_dir / "sensitivity.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return save_dir / "sensitivity.md"
