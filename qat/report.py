"""The QAT run's tables: FP32 / PTQ / QAT (report.md/json), the --calib-method auto candidates
(calibration_selection.md/json), and which model qat_best.pt holds."""
import json
from pathlib import Path

from qat.compat import load_checkpoint
from qat.evaluation import METRICS
from utils.general import LOGGER


def write_calibration_selection(table, best, save_dir):
    save_dir = Path(save_dir)
    (save_dir / "calibration_selection.json").write_text(json.dumps({"chosen": best["candidate"], "candidates": table},
                                                                    indent=1))
    lines = ["# --calib-method auto: PTQ on the selection split", "",
             "| calibration | mAP50-95 | mAP50 | P | R |", "|---|---|---|---|---|"]
    for r in table:
        mark = " (chosen)" if r is best else ""
        lines.append(f"| {r['candidate']}{mark} | {r['map']:.4f} | {r['map50']:.4f} | {r['mp']:.4f} | {r['mr']:.4f} |")
    text = "\n".join(lines) + "\n"
    (save_dir / "calibration_selection.md").write_text(text)
    LOGGER.info("\n" + text)

def best_note(path):
    """Which model qat_best.pt holds, in words."""
    if not Path(path).is_file():
        return ""
    ckpt = load_checkpoint(path)
    epoch, iteration = int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0))
    if not (epoch or iteration) and "history" not in ckpt:
        return "qat_best.pt: the PTQ (calibrated) model (--epochs 0)"
    if not (epoch or iteration):
        return "qat_best.pt: the PTQ (calibrated) model: no QAT evaluation beat its mAP50-95 on the selection split"
    where = f"epoch {epoch}" + (f", iteration {iteration}" if iteration else " (end)")
    return f"qat_best.pt: QAT at {where}, the best mAP50-95 on the selection split"

def write_report(rows, save_dir, title="QAT report", note=""):
    """FP32 vs PTQ vs QAT table (markdown + JSON), deltas against FP32; printed too."""
    save_dir = Path(save_dir)
    ref = rows.get("FP32")
    table = []
    for name, r in rows.items():
        entry = {"model": name, **{k: r.get(k) for k in METRICS}}
        if ref is not None:
            entry.update({f"d_{k}": r[k] - ref[k] for k in METRICS if r.get(k) is not None})
        table.append(entry)
    (save_dir / "report.json").write_text(json.dumps(table, indent=1))
    head = "| model | mAP50-95 | mAP50 | P | R |" + (" Δ mAP50-95 | Δ mAP50 | Δ P | Δ R |" if ref else "")
    lines = [f"# {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for e in table:
        cells = [e["model"]] + [f"{e[k]:.4f}" for k in METRICS]
        if ref:
            cells += [f"{e['d_' + k]:+.4f}" for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    (save_dir / "report.md").write_text(text)
    LOGGER.info("\n" + text)
    return save_dir / "report.md"

def method_note(opt):
    """The optional PTQ / QAT steps the run used (--bias-correction, --learn-ranges), in words."""
    parts = []
    if getattr(opt, "bias_correction", 0):
        parts.append(f"bias correction on {opt.bias_correction} calibration images (PTQ and QAT start from it)")
    if getattr(opt, "learn_ranges", False) and getattr(opt, "epochs", 0):
        parts.append(f"learned activation ranges in QAT (LSQ, lr x {opt.range_lr_mult:g})")
    text = "; ".join(parts)
    return f"\n\n{text[:1].upper()}{text[1:]}" if parts else ""

def selection_note(select_rows):
    """The selection-split table appended to report.md."""
    if not select_rows:
        return ""
    lines = ["", "", "Selection split (chooses qat_best.pt; never the split above):", "",
             "| model | mAP50-95 | mAP50 |", "|---|---|---|"]
    for name, r in select_rows.items():
        if r.get("map") is not None:
            lines.append(f"| {name} | {r['map']:.4f} | {r['map50']:.4f} |")
    return "\n".join(lines)
