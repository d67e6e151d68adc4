"""Accuracy of the INT8 model: FP32, PTQ per calibration method, QAT per recipe and the deployed
model (OpenVINO), as mean +- std over seeds, on the demo model and on a quantization-sensitive case.

    python benchmarks/bench_accuracy.py                                    # the full run (hours on 2 cores)
    python benchmarks/bench_accuracy.py --seeds 0 --val-images 16 --calib-batches 2 --select-images 8 \
        --epochs 1 --iters-per-epoch 2 --methods max mse --recipes layers --cases demo --name tiny

Every number comes from the project's own commands, run in this process (the deployed rows in a spawned
child): `train_qat.run_api`
(train_qat.py) for PTQ (`--epochs 0`, one run per --calib-method) and QAT (one run per --recipe,
calibration auto), `export_qat.run` + `val_trt.run --backend openvino` for the deployed rows (fully INT8,
and with the head float as `export_qat.py --no-last-layer` writes it). A seed
changes the calibration sample, the training data order and, when the data yaml has no `select:`
split (images the checkpoint never trained on; the demo data has one), the held-out selection split
(`--seed`); the val images stay the same (`--val-images N`: the first N val images, written as a
list so that train_qat.py and val_trt.py see exactly the same ones). `--auto-skip BUDGET` runs the QAT
recipes with train_qat.py --auto-skip (the fewest layers kept float for PTQ within BUDGET of FP32 on the
selection split): their rows, their PTQ starting point and the deployed rows say so and name the layers.

Cases: `demo` (8-bit weights), `w7` (7-bit weights, what CPUs without VNNI need: coarser, so
PTQ loses more; DESIGN.md section 5) and `w7-entropy`, the quantization-sensitive case: 7-bit weights
with entropy calibration (TensorRT's legacy IInt8EntropyCalibrator2 rule), where PTQ loses
0.0111 +- 0.0035 mAP50-95 on the demo checkpoint while `w7` with auto calibration loses 0.0033
(benchmarks/results/accuracy-w7-entropy-200.md: 320 val images, seeds 0 1 2). The demo checkpoint
is robust otherwise: auto-calibrated PTQ loses 0.002-0.003 with 8- or 7-bit weights. Rows whose protocol differs are kept apart: train_qat.py
evaluates with rectangular batches (val.py), val_trt.py with square letterbox batches, so the
deployed row is compared with the FP32 checkpoint evaluated in the same val_trt run (beside the
fake-quant row and qat_best.pt's weights in float, which QAT moves too).

Writes benchmarks/results/accuracy-<name>.{md,json,png}.
"""
import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.general import LOGGER, UserError, check_dataset, run_cli, yaml_save  # noqa: E402
from utils.torch_utils import atomic_output, save_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VAL_TRT_FP32 = "FP32 (val_trt protocol)"  # the FP32 checkpoint (--weights) in val_trt.py's protocol: the deployed rows' baseline
# qat_best.pt's weights with the quantizers off (val_trt.py's "PyTorch FP32 (quantizers off)" row): QAT moves the float
# model too (recipe kd's weights scored +0.0014 above the FP32 checkpoint in float), so it is no baseline, only a note
QAT_FLOAT = "float weights of qat_best.pt (val_trt protocol)"
HEAD_FLOAT = "deployed head-float"  # the same qat_best.pt exported with --no-last-layer (detection head without Q/DQ)
HEAD_FLOAT_SUFFIX = "-head-float"
# calib: the calibration the case's QAT runs start from ('auto': chosen on the selection split)
CASES = {"demo": {"weight_bits": 8, "calib": "auto"}, "w7": {"weight_bits": 7, "calib": "auto"},
         "w7-entropy": {"weight_bits": 7, "calib": "entropy"}}
METHODS = ("max", "percentile", "mse", "entropy", "auto")
RECIPES = ("layers", "blocks", "kd")


def subset_data(data, n_val, work):
    """A data yaml whose val is the first n_val val images (0: all), as an image list in `work`."""
    from utils.dataloaders import list_image_files
    d = check_dataset(data)
    out = {k: d[k] for k in ("nc", "names", "train", "select") if d.get(k)}
    files = list_image_files(d["val"], "val: ")
    if n_val:
        files = files[:n_val]
    work.mkdir(parents=True, exist_ok=True)
    (work / "val.txt").write_text("\n".join(files) + "\n")
    out["val"] = str(work / "val.txt")
    yaml_save(work / "data.yaml", out)
    return str(work / "data.yaml")


def selection_description(data, select_images):
    """What QAT's choices were made on (train_qat.py: the data yaml's `select:` split, else held-out train images)."""
    from utils.dataloaders import list_image_files
    d = check_dataset(data)
    if d.get("select"):
        return f"the data yaml's select split ({len(list_image_files(d['select']))} images never trained on)"
    return f"{select_images} held-out train images"


def _metrics(row):
    return {k: float(row[k]) for k in ("map", "map50")}


def deployed(best_pt, fp32_weights, data, imgsz, work, name):
    """Export qat_best.pt twice, fully INT8 and with the detection head float (export_qat.py
    --no-last-layer, as the README's export command does), and validate both on
    OpenVINO with the FP32 checkpoint beside them (val_trt protocol) -> {row key: metrics}: deployed,
    HEAD_FLOAT, fake-quant, the FP32 checkpoint (VAL_TRT_FP32) and qat_best.pt's weights in float (QAT_FLOAT)."""
    import export_qat
    import val_trt
    best_pt = Path(best_pt)
    # export_qat.py writes <weights stem>.onnx beside the weights: the head-float export is renamed before the second
    head_float = best_pt.with_name(f"{best_pt.stem}{HEAD_FLOAT_SUFFIX}.onnx")
    export_qat.run(weights=str(best_pt), imgsz=[imgsz], device="cpu", no_last_layer=True)
    best_pt.with_suffix(".onnx").replace(head_float)
    export_qat.run(weights=str(best_pt), imgsz=[imgsz], device="cpu")
    onnx = [str(best_pt.with_suffix(".onnx")), str(head_float)]
    r = val_trt.run(data=data, weights=onnx, checkpoint=[str(fp32_weights), str(best_pt)], imgsz=imgsz, batch_size=8,
                    backend="openvino", device="cpu", workers=1, reference=False, project=str(work / "val_trt"),
                    name=name, exist_ok=True)
    return val_trt_rows(r["rows"])


def deployed_in_child(*args):
    """`deployed` in a fresh (spawned) process: OpenVINO's runtime never shares a process with the next
    seed's calibration and training (one run here died with a segmentation fault in the calibration
    that followed two OpenVINO models compiled in the same process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(deployed, *args).result()


def val_trt_rows(rows):
    """val_trt.run's rows (the FP32 checkpoint, then qat_best.pt, then the deployed files) -> {key: metrics}."""
    pick = lambda v: {"map": float(v["mAP50-95"]), "map50": float(v["mAP50"])}  # noqa: E731
    out = {}
    for row in rows:
        k = row["model"]
        if "fake-quant" in k:
            out["fake-quant"] = pick(row)
        elif "quantizers off" in k:
            out[QAT_FLOAT] = pick(row)
        elif k.startswith("PyTorch FP32"):
            out[VAL_TRT_FP32] = pick(row)
        elif "openvino" in k.lower() or "openvino" in str(row.get("runtime", "")).lower():
            out[HEAD_FLOAT if f"{HEAD_FLOAT_SUFFIX}.onnx" in k else "deployed"] = pick(row)
    return out


def skip_suffix(budget):
    """Label suffix of the rows of QAT runs with train_qat.py --auto-skip (their PTQ row too: it has the float layers)."""
    return "" if budget is None else f", auto-skip {budget:g}"


def float_layers(settings):
    """'; float 15 22': the top-level layers --auto-skip kept in float (from the run's skip regexes)."""
    from qat.sensitivity import skipped_layers
    return f"; float {' '.join(map(str, skipped_layers(settings.skip_layers))) or 'none'}"


def _rule(st):
    """The calibration rule a run used (auto: the one it chose)."""
    return f"percentile {st.percentile:g}" if st.calib_method == "percentile" else st.calib_method


def run_case(case, seed, opt, data, work):
    """{row label: {'map', 'map50'}} for one case and one seed."""
    import train_qat
    base = dict(weights=opt.weights, data=data, imgsz=opt.imgsz, batch_size=opt.batch_size, device="cpu",
                workers=opt.workers, calib_batches=opt.calib_batches, select_images=opt.select_images, seed=seed,
                weight_bits=CASES[case]["weight_bits"], project=str(work / "runs"), exist_ok=True,
                bias_correction=opt.bias_correction)
    rows, calib = {}, CASES[case]["calib"]
    for i, method in enumerate(opt.methods):
        r = train_qat.run_api(**base, calib_method=method, epochs=0, no_eval_origin=i > 0,
                              name=f"{case}-ptq-{method}-s{seed}")
        if "FP32" in r["rows"]:
            rows["FP32"] = _metrics(r["rows"]["FP32"])
        row = _metrics(r["rows"]["PTQ"])
        if method == "auto":  # which rule the selection split chose
            row["chosen"] = _rule(r["settings"])
        rows[f"PTQ {method}"] = row
    skip = skip_suffix(opt.auto_skip)
    for recipe in opt.recipes:
        name = f"{case}-qat-{recipe}-s{seed}"
        r = train_qat.run_api(**base, calib_method=calib, recipe=recipe, epochs=opt.epochs,
                              iters_per_epoch=opt.iters_per_epoch, eval_period=opt.eval_period,
                              learn_ranges=opt.learn_ranges, range_lr_mult=opt.range_lr_mult,
                              auto_skip=opt.auto_skip, no_eval_origin="FP32" in rows, name=name)
        if "FP32" in r["rows"]:
            rows["FP32"] = _metrics(r["rows"]["FP32"])
        floats = float_layers(r["settings"]) if skip else ""
        if f"PTQ {calib}{skip}" not in rows:  # the QAT run's own starting point: the same calibration and seed
            rows[f"PTQ {calib}{skip}"] = {**_metrics(r["rows"]["PTQ"]), "chosen": _rule(r["settings"]) + floats}
        rows[f"QAT {recipe}{skip}"] = {**_metrics(r["rows"]["QAT"]),
                                      "chosen": f"step {r['rows']['QAT'].get('step', 0)}{floats}"}
        if opt.deploy and recipe == opt.recipes[0]:
            labels = {VAL_TRT_FP32: VAL_TRT_FP32,
                      "deployed": f"deployed OpenVINO (QAT {recipe}{skip}, val_trt protocol)",
                      HEAD_FLOAT: f"deployed OpenVINO, head float (QAT {recipe}{skip}, --no-last-layer, val_trt protocol)",
                      "fake-quant": f"fake-quant (QAT {recipe}{skip}, val_trt protocol)",
                      QAT_FLOAT: f"float weights of qat_best.pt (val_trt protocol, QAT {recipe}{skip})"}
            for key, row in deployed_in_child(r["best"], opt.weights, data, opt.imgsz, work, name).items():
                rows[labels[key]] = row
    return rows


def summarise(per_seed):
    """{case: {label: [rows over seeds]}} -> {case: [{'model', 'n', 'map_mean', 'map_std', ...}]}. Δ against
    FP32 of the same protocol: train_qat.py's rows against "FP32", val_trt rows against VAL_TRT_FP32."""
    out = {}
    for case, labels in per_seed.items():
        ref, ref_val_trt = (statistics.mean(r["map"] for r in labels[k]) if labels.get(k) else None
                            for k in ("FP32", VAL_TRT_FP32))
        table = []
        for label, rs in labels.items():
            maps = [r["map"] for r in rs]
            entry = {"model": label, "n": len(rs), "map_mean": statistics.mean(maps),
                     "map_std": statistics.stdev(maps) if len(maps) > 1 else 0.0,
                     "map50_mean": statistics.mean(r["map50"] for r in rs)}
            if any("chosen" in r for r in rs):  # auto's rule / qat_best.pt's QAT step (0: PTQ) per seed
                entry["chosen"] = [r.get("chosen") for r in rs]
            base = ref_val_trt if "val_trt" in label else ref
            if base is not None:
                entry["d_map_mean"] = entry["map_mean"] - base
            table.append(entry)
        out[case] = table
    return out


def recovered(table, calib="auto", skip=""):
    """Share of the PTQ drop (the calibration the QAT runs start from, with the same --auto-skip float
    layers: `skip` is the rows' skip_suffix) that each QAT recipe wins back, from the means."""
    by = {r["model"]: r for r in table}
    fp32, ptq = by.get("FP32"), by.get(f"PTQ {calib}{skip}")
    if not (fp32 and ptq) or fp32["map_mean"] - ptq["map_mean"] <= 0:
        return {}
    drop = fp32["map_mean"] - ptq["map_mean"]
    return {r["model"]: (r["map_mean"] - ptq["map_mean"]) / drop for r in table if r["model"].startswith("QAT")}


def to_markdown(result):
    o = result["options"]
    lines = ["# INT8 accuracy: calibration methods, QAT recipes, deployed model", "",
             f"{result['date']}, {o['weights']}, {o['imgsz']} px, val images: {o['val_images'] or 'all'}, "
             f"seeds {o['seeds']}, calibration {o['calib_batches']} batches of {o['batch_size']}, selection split "
             f"{result.get('selection') or str(o['select_images']) + ' held-out train images'}, "
             f"QAT {o['epochs']} x {o['iters_per_epoch']} iterations. "
             f"{result['seconds']:.0f} s.", "",
             "mAP50-95 mean +- std over seeds; Δ against FP32 in the same protocol (train_qat.py's rectangular "
             "batches, or val_trt.py's square letterbox for the deployed rows, against the FP32 checkpoint "
             "evaluated in the same val_trt.py run). `PTQ auto` picks the rule "
             "on the selection split, never on val; QAT starts from the case's calibration (auto unless the "
             "case names one); a QAT row is qat_best.pt, chosen on the selection split "
             "(step 0: no QAT evaluation beat PTQ there).", "", f"Command: `{result['command']}`"]
    for case, table in result["summary"].items():
        head = f"{case} (weights {CASES[case]['weight_bits']}-bit, QAT from {CASES[case]['calib']} calibration)"
        lines += ["", f"## {head}", "",
                  "| model | mAP50-95 | Δ vs FP32 | mAP50 | seeds | chosen per seed |", "|---|---|---|---|---|---|"]
        for r in table:
            d = f"{r['d_map_mean']:+.4f}" if "d_map_mean" in r else ""
            lines.append(f"| {r['model']} | {r['map_mean']:.4f} ± {r['map_std']:.4f} | {d} | {r['map50_mean']:.4f} "
                         f"| {r['n']} | {', '.join(map(str, r.get('chosen', [])))} |")
        rec = recovered(table, CASES[case]["calib"], skip_suffix(o.get("auto_skip")))
        if rec:
            lines += ["", f"Share of the PTQ ({CASES[case]['calib']}) drop recovered: " +
                      ", ".join(f"{k} {v:.0%}" for k, v in rec.items())]
    return "\n".join(lines) + "\n"


def chart(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(result["summary"])
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        table = result["summary"][case]
        labels = [r["model"].replace(" (", "\n(") for r in table]
        ax.barh(range(len(table)), [r["map_mean"] for r in table], xerr=[r["map_std"] for r in table], color="#4c72b0")
        ax.set_yticks(range(len(table)), labels, fontsize=7)
        lo = min(r["map_mean"] - r["map_std"] for r in table)
        hi = max(r["map_mean"] + r["map_std"] for r in table)
        ax.set_xlim(max(0.0, lo - 0.1 * (hi - lo + 1e-3)), hi + 0.1 * (hi - lo + 1e-3))
        ax.invert_yaxis()
        ax.set_xlabel("mAP50-95 (mean ± std over seeds)")
        ax.set_title(f"{case} ({CASES[case]['weight_bits']}-bit weights)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="INT8 accuracy benchmark (mean +- std over seeds)")
    p.add_argument("--weights", default=str(ROOT / "weights/demo-gelan.pt"))
    p.add_argument("--data", default=str(ROOT / "data/demo.yaml"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                   help="PTQ rows (none: PTQ auto comes from the QAT runs)")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES), help="none: PTQ only")
    p.add_argument("--val-images", type=int, default=0, help="first N val images (0: all)")
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--select-images", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    # one epoch of train_qat.py's default (10 x 200): the sensitive case won back 79 % of its PTQ drop after 60
    # iterations, 82 % after 200 (benchmarks/results/accuracy-w7-entropy-200.md)
    p.add_argument("--iters-per-epoch", type=int, default=200)
    p.add_argument("--eval-period", type=int, default=40)
    p.add_argument("--bias-correction", type=int, default=0, metavar="IMAGES",
                   help="train_qat.py --bias-correction for every PTQ and QAT run (0: off)")
    p.add_argument("--learn-ranges", action=argparse.BooleanOptionalAction, default=None,
                   help="train_qat.py --learn-ranges / --no-learn-ranges for the QAT runs (default: the recipe's)")
    p.add_argument("--range-lr-mult", type=float, default=None,
                   help="train_qat.py --range-lr-mult for the QAT runs (default: the recipe's)")
    p.add_argument("--auto-skip", type=float, default=None, metavar="BUDGET",
                   help="train_qat.py --auto-skip for the QAT runs: the fewest layers float for mAP50-95 >= FP32 - "
                        "BUDGET on the selection split (their rows say ', auto-skip BUDGET' and which layers)")
    p.add_argument("--no-deploy", dest="deploy", action="store_false", help="skip export + OpenVINO")
    p.add_argument("--name", default="demo-gelan")
    return p.parse_args(argv)


def main(argv=None):
    opt = parse_opt(argv)
    if len(set(opt.seeds)) < len(opt.seeds):
        raise UserError("--seeds must be distinct")
    t0 = time.time()
    work = ROOT / "runs" / "bench_accuracy" / opt.name
    data = subset_data(opt.data, opt.val_images, work)
    per_seed = {}
    for case in opt.cases:
        per_seed[case] = {}
        for seed in opt.seeds:
            LOGGER.info(f"bench_accuracy: case {case}, seed {seed}")
            for label, row in run_case(case, seed, opt, data, work).items():
                per_seed[case].setdefault(label, []).append(row)
    result = {"date": datetime.now().isoformat(timespec="seconds"), "options": vars(opt),
              "selection": selection_description(data, opt.select_images),
              "command": "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "per_seed": per_seed, "summary": summarise(per_seed), "seconds": time.time() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"accuracy-{opt.name}"
    text = to_markdown(result)
    save_tables(stem, text, result)
    chart(result, stem.with_suffix(".png"))
    print(text)
    return result


if __name__ == "__main__":
    run_cli(main)
