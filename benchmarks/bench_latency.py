"""CPU latency / throughput of one network as FP32 ONNX, QAT (Q/DQ) ONNX and NNCF post-training INT8,
all on OpenVINO, measured side by side in one run (DESIGN.md section 5).

    python benchmarks/bench_latency.py --cfg models/detect/gelan-c.yaml --imgsz 640 --threads 2
    python benchmarks/bench_latency.py --weights weights/demo-gelan.pt --data data/demo.yaml --imgsz 320
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_latency.py ...     # as on a CPU without VNNI

Without --weights the network has random weights (speed does not depend on them) and the QAT model
is the same network quantized by qat.quantize + qat.calibrate on a few images (random ones, or
--data's). With a QAT checkpoint its float copy is the FP32 model; with a plain one the QAT model is
made from it the same way. The NNCF peer is nncf.quantize on the FP32 OpenVINO model with the same
calibration images.

Rows, per batch size: the FP32 ONNX under OpenVINO's default precision (bf16 on CPUs that have it:
what a user gets out of the box) and forced f32; the QAT Q/DQ ONNX in both activation forms (int8
zero point 0 as exported, uint8 zero point 128), the one qat.deploy.openvino.choose_form picks for
this CPU marked as deployed (--act-form overrides); the deployed form with the detection head float
(what export_qat.py --no-last-layer writes); with --float-layers, the deployed form with each set of
top-level layers float (train_qat.py --auto-skip's sets); NNCF; an exported IR folder (--ir) if given.
INT8 rows run with float layers in f32, as deployed. Every ratio is against the fastest float row;
an INT8 row slower than it says so. The models take turns, round by round, so load on a shared
machine hits them alike. Also: INT8 vs float convolutions of OpenVINO's runtime model, the per-op
profile (PERF_COUNT) of the deployed model and the default-precision float model at the first batch
size, the CPU's flags and the effective ISA (ONEDNN_MAX_CPU_ISA), model sizes. Written to
benchmarks/results/<name>.{md,json,png} and <name>-profile.md (<name> gets -<isa> under
ONEDNN_MAX_CPU_ISA); `python benchmarks/make_readme.py` turns the results into the README section.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from copy import deepcopy
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli import ArgumentParser, add_trusted_flag, cli_main, imgsz_int, nonneg_int, positive_int  # noqa: E402
from utils.general import LOGGER, UserError, check_img_size, run_cli  # noqa: E402
from utils.torch_utils import atomic_output, save_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine():
    """The CPU, its INT8-relevant flags, the ISA OpenVINO will use, the runtimes."""
    import openvino as ov

    from qat.deploy.cpu import effective_isa
    from qat.deploy.latency import float_precisions

    isa = effective_isa()
    name = isa.get("model") or platform.processor() or platform.machine()
    kinds = {"amx": "AMX", "vnni": "VNNI, no AMX", "avx2": "AVX2, no VNNI", "older": "no AVX2", None: "ISA unknown"}
    cap = f" under ONEDNN_MAX_CPU_ISA={isa['cap']}" if isa["cap"] else ""
    return {"cpu": name, "logical_cpus": os.cpu_count(), "flags": isa["flags"], "isa": isa["isa"],
            "isa_cap": isa["cap"], "int8": kinds.get(isa["isa"], str(isa["isa"])) + cap,
            "default_precision": next(iter(float_precisions())), "openvino": ov.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def _calibration(data, imgsz, n, seed=0):
    """n float images (1, 3, imgsz, imgsz) 0-1: from --data's train split, else random."""
    if data:
        from utils.dataloaders import create_dataloader
        from utils.general import check_dataset

        d = check_dataset(data, required=("train",))
        loader = create_dataloader(d["train"], imgsz, 1, 32, rect=False, workers=0, shuffle=False)[0]
        out = []
        for im, *_ in loader:
            out.append(im.float() / 255)
            if len(out) >= n:
                break
        return out
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, imgsz, imgsz, generator=g) for _ in range(n)]


def build_models(cfg, weights, imgsz, calib, trusted=False):
    """(fp32 model, qat model, description) from --weights or --cfg (random weights)."""
    from qat.calibrate import calibrate
    from qat.quantize import float_copy, quantize_model
    from qat.settings import QuantSettings

    if weights:
        from models.experimental import attempt_load, load_checkpoint
        from qat.checkpoint import is_qat_checkpoint, load_qat

        if is_qat_checkpoint(load_checkpoint(weights, trusted=trusted)):
            qmodel, _, _ = load_qat(weights, trusted=trusted)
            return float_copy(qmodel).eval(), qmodel.eval(), f"{Path(weights).name} (QAT checkpoint)"
        fp32 = attempt_load(weights, fuse=True, trusted=trusted)
        desc = f"{Path(weights).name} (plain checkpoint, quantized + calibrated here)"
    else:
        from models.yolo import DetectionModel

        torch.manual_seed(0)
        fp32 = DetectionModel(cfg).fuse().eval()
        desc = f"{Path(cfg).stem}, random weights"
    settings = QuantSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(deepcopy(fp32), settings)
        calibrate(qmodel, calib, settings, show=False)
    return fp32, qmodel.eval(), desc


def nncf_quantize(fp32_onnx, calib, imgsz):
    """OpenVINO's own post-training INT8 (nncf.quantize, default preset) of the FP32 model."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    model.reshape({model.inputs[0].get_any_name(): [1, 3, imgsz, imgsz]})
    dataset = nncf.Dataset([x.numpy() for x in calib])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(model, dataset, subset_size=len(calib))


def time_tensorrt(f_onnx, q_onnx, batch_sizes, imgsz, iters, warmup, tmp, sizes):
    """{batch: {label: row}} for TensorRT (FP16 engine of the FP32 ONNX, INT8 engine of the Q/DQ
    ONNX) when tensorrt and a GPU are here; {} otherwise. Host-to-host latency per call."""
    from qat.deploy import TensorRTBackend, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        LOGGER.info(f"TensorRT rows skipped: {why}")
        return {}
    out = {str(b): {} for b in batch_sizes}
    for label, path in (("TensorRT FP16 (FP32 ONNX)", f_onnx), ("TensorRT INT8 (QAT ONNX)", q_onnx)):
        engine = tmp / f"{path.stem}.engine"
        backend = TensorRTBackend(path, engine=engine, max_batch=max(batch_sizes), opt_batch=1, imgsz=imgsz)
        sizes[f"{label} engine"] = engine.stat().st_size / (1 << 20)
        for b in batch_sizes:
            x = np.random.default_rng(0).random((b, 3, imgsz, imgsz), dtype=np.float32)
            for _ in range(warmup):
                backend._infer(x)
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                backend._infer(x)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            out[str(b)][label] = {"latency_ms": med * 1e3, "imgs_per_s": b / med, "int8_convs": None, "convs": None}
    for b in out:
        base = out[b]["TensorRT FP16 (FP32 ONNX)"]["latency_ms"]
        for r in out[b].values():
            r["speedup_vs_trt_fp16"] = base / r["latency_ms"]
    return out


def _sizes(fp32, ov_models, tmp):
    import openvino as ov

    from qat.deploy import compressed_ir
    from utils.torch_utils import save_atomic

    out = {}
    p = Path(tmp) / "fp32.pt"
    save_atomic({"model": deepcopy(fp32).float()}, p)
    out["FP32 .pt"] = p.stat().st_size / (1 << 20)
    p = Path(tmp) / "fp16.pt"
    save_atomic({"model": deepcopy(fp32).half()}, p)
    out["FP16 .pt"] = p.stat().st_size / (1 << 20)
    for label, m in ov_models.items():
        xml = Path(tmp) / f"{label.split()[0]}.xml"
        ov.save_model(compressed_ir(m), str(xml), compress_to_fp16=False)
        out[f"{label} IR"] = xml.with_suffix(".bin").stat().st_size / (1 << 20)
    return out


def _form_models(q_onnx, choice):
    """{label: (ov.Model, 'f32')} of the Q/DQ ONNX in both activation forms, with the chosen weight
    bits; the chosen form's label says '(deployed)'."""
    import onnx

    from qat.deploy.openvino import FormChoice, prepare_onnx, read_onnx

    out = {}
    for form in ("int8", "uint8"):
        m = onnx.load(str(q_onnx))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 7-bit re-quantization warning: speed only here
            prepare_onnx(m, FormChoice(form, choice.weight_bits, choice.reason, choice.isa))
        out[f"QAT Q/DQ, {form} form" + (" (deployed)" if form == choice.act_form else "")] = (read_onnx(m), "f32")
    return out


def _partly_float_model(qmodel, layers, path, imgsz, choice):
    """{label: (ov.Model, 'f32')} of the QAT model with the top-level layers `layers` float, in the chosen
    activation form: the detection head alone (None: what export_qat.py --no-last-layer writes, the README's
    export command), or a --float-layers set (what train_qat.py --skip-layers / --auto-skip keep float)."""
    import onnx

    from qat.deploy.openvino import prepare_onnx, read_onnx
    from qat.export import export_qat_onnx
    from qat.quantize import disable_slots, head_prefix
    from qat.sensitivity import layer_prefix

    model = deepcopy(qmodel)
    disable_slots(model, [head_prefix(model)] if layers is None else [layer_prefix(i) for i in layers])
    export_qat_onnx(model, path, imgsz, batch_size=1, dynamic=True)
    m = onnx.load(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_onnx(m, choice)
    what = "head float (--no-last-layer)" if layers is None else f"layers {' '.join(map(str, layers))} float"
    return {f"QAT Q/DQ, {what}, {choice.act_form} form": (read_onnx(m), "f32")}


def headline(results, batch="1"):
    """One sentence: the deployed model against the fastest float row (and NNCF) at `batch`."""
    from qat.deploy.latency import speed_phrase

    rows = results["batches"].get(batch) or next(iter(results["batches"].values()))
    dep, flt = rows.get(results.get("deployed")), rows.get(results.get("fastest_float", {}).get(batch))
    if not dep or not flt or "latency_ms" not in dep:
        return ""
    b = batch if batch in results["batches"] else next(iter(results["batches"]))
    text = (f"Batch {b}: deployed INT8 ({results['deployed']}, {dep['latency_ms']:.1f} ms) "
            f"**{speed_phrase(dep['vs_float'])}** than the fastest float row ({results['fastest_float'][b]}, "
            f"{flt['latency_ms']:.1f} ms)")
    nncf = rows.get("NNCF PTQ INT8")
    if nncf and "latency_ms" in nncf:
        text += f"; NNCF {nncf['latency_ms']:.1f} ms ({speed_phrase(nncf['vs_float'])}); deployed / NNCF speed " \
                f"{nncf['latency_ms'] / dep['latency_ms']:.2f}x"
    return text + "."


def run(cfg="models/detect/gelan-c.yaml", weights=None, data=None, imgsz=640, batch_sizes=(1, 4, 8), threads=2,
        iters=5, rounds=4, warmup=2, calib_images=8, nncf=True, act_form="auto", vnni="auto", ir=None, profile=True,
        name=None, out=RESULTS, trusted=False, float_layers=()):
    import onnx
    import openvino as ov

    from qat.deploy.latency import float_precisions, time_round_robin, versus_float
    from qat.deploy.openvino import choose_form, ir_xml, read_onnx
    from qat.export import export_qat_onnx
    from qat.lint import lint

    imgsz = check_img_size(imgsz, s=32)
    if not weights and not Path(cfg).is_file():
        raise UserError(f"--cfg {cfg} not found; pass a model yaml (models/detect/*.yaml) or --weights")
    if ir is not None and ir_xml(ir) is None:
        raise UserError(f"--ir {ir} is not an OpenVINO IR folder or .xml (export_qat.py --include openvino)")
    info = machine()
    name = name or (Path(weights).stem if weights else Path(cfg).stem) + \
        (f"-{info['isa_cap'].lower()}" if info["isa_cap"] else "")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LOGGER.info(f"benchmark {name}: {info}")
    calib = _calibration(data, imgsz, calib_images)
    t0 = time.time()
    fp32, qmodel, desc = build_models(cfg, weights, imgsz, calib, trusted)
    LOGGER.info(f"models ready ({time.time() - t0:.0f} s): {desc}")
    bad = [i for layers in float_layers for i in layers if i >= len(qmodel.model)]
    if bad:
        raise UserError(f"--float-layers {bad[0]}: the network has layers 0-{len(qmodel.model) - 1}")

    with tempfile.TemporaryDirectory() as tmp:
        f_onnx, q_onnx = Path(tmp) / "fp32.onnx", Path(tmp) / "qat.onnx"
        t0 = time.time()
        export_qat_onnx(fp32, f_onnx, imgsz, batch_size=1, dynamic=True)
        export_qat_onnx(qmodel, q_onnx, imgsz, batch_size=1, dynamic=True)
        violations = lint(q_onnx)
        LOGGER.info(f"exported ({time.time() - t0:.0f} s); qat.lint: {len(violations)} violation(s)")
        choice = choose_form(act_form, {"auto": None, "yes": True, "no": False}[vnni], onnx.load(str(q_onnx)),
                             threads, [1, 3, imgsz, imgsz])
        LOGGER.info(f"OpenVINO INT8 form for this CPU: {choice.describe()}")
        floats = {f"FP32 ONNX, {label}": (read_onnx(f_onnx), prec) for label, prec in float_precisions().items()}
        models = {**floats, **_form_models(q_onnx, choice),
                  **_partly_float_model(qmodel, None, Path(tmp) / "qat-head-float.onnx", imgsz, choice)}
        for k, layers in enumerate(float_layers):
            models.update(_partly_float_model(qmodel, layers, Path(tmp) / f"qat-float-layers-{k}.onnx", imgsz, choice))
        deployed = next(k for k in models if k.endswith("(deployed)"))
        if nncf:
            t0 = time.time()
            models["NNCF PTQ INT8"] = (nncf_quantize(f_onnx, calib, imgsz), "f32")
            LOGGER.info(f"NNCF quantized ({time.time() - t0:.0f} s)")
        if ir is not None:
            models[f"IR {Path(ir).name}"] = (ov.Core().read_model(str(ir_xml(ir))), "f32")
        sizes = _sizes(fp32, {k: m for k, (m, _) in models.items() if k not in floats}, tmp)

        results = {"name": name, "model": desc, "imgsz": imgsz, "threads": threads, "machine": info,
                   "date": datetime.now().isoformat(timespec="seconds"), "lint_violations": len(violations),
                   "choice": choice.to_dict(), "deployed": deployed, "float_rows": list(floats),
                   "sizes_mb": sizes, "batches": {}, "fastest_float": {}, "profile": {}}
        for i, b in enumerate(batch_sizes):
            LOGGER.info(f"timing batch {b}: {len(models)} models x {rounds} rounds x {iters} calls...")
            prof = (deployed, next(iter(floats))) if profile and i == 0 else ()
            rows = time_round_robin(models, [b, 3, imgsz, imgsz], threads, iters, rounds, warmup, profile=prof)
            results["fastest_float"][str(b)] = versus_float(rows, list(floats))
            for k, r in rows.items():
                if "profile" in r:
                    results["profile"][k] = {"batch": b, **r.pop("profile")}
            results["batches"][str(b)] = rows
        results["headline"] = headline(results, str(batch_sizes[0]))
        trt = time_tensorrt(f_onnx, q_onnx, batch_sizes, imgsz, iters * rounds, warmup, Path(tmp), sizes)
        for b, rows in trt.items():
            results["batches"][str(b)].update(rows)
    write(results, out)
    return results


def _ratio_cell(r, fastest):
    if "vs_float" in r:
        cell = f"{r['vs_float']:.2f}x"
        return cell + (" (fastest float)" if fastest else " **slower**" if r.get("slower") else "")
    if "speedup_vs_trt_fp16" in r:
        return f"{r['speedup_vs_trt_fp16']:.2f}x TRT FP16"
    return f"{r['speedup']:.2f}x" if "speedup" in r else "-"  # results written before the float rows existed


def table(results):
    """Markdown of one result dict: the setting, the headline, the rows."""
    m = results["machine"]
    flags = f", flags {' '.join(m['flags'])}" if m.get("flags") else ""
    lines = [f"**{results['model']}**, {results['imgsz']} px, OpenVINO {m['openvino']}, {results['threads']} threads, "
             f"{m['cpu']} ({m['int8']}{flags}), {results['date']}", ""]
    if results.get("choice"):
        c = results["choice"]
        lines += [f"Deployed form: {c['act_form']} activations, {c['weight_bits']}-bit weights ({c['reason']}).", ""]
    if results.get("headline"):
        lines += [results["headline"], ""]
    lines += ["| model | batch | runs in | latency ms | images/s | vs fastest float | convolutions in INT8 |",
              "|---|---|---|---|---|---|---|"]
    for b, rows in results["batches"].items():
        fastest = results.get("fastest_float", {}).get(b)
        for k, r in rows.items():
            if "error" in r:
                why = " (a precision above ONEDNN_MAX_CPU_ISA; a CPU of this kind defaults to f32)" \
                    if m.get("isa_cap") and k in results.get("float_rows", ()) else ""
                lines.append(f"| {k} | {b} | - | - | - | not compiled{why}: {r['error'][:80]} | - |")
                continue
            convs = f"{r['int8_convs']}/{r['convs']}" if r.get("convs") else "-"
            lines.append(f"| {k} | {b} | {r.get('precision', '-')} | {r['latency_ms']:.1f} | {r['imgs_per_s']:.2f} | "
                         f"{_ratio_cell(r, k == fastest)} | {convs} |")
    lines += ["", "| file | MB |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in results["sizes_mb"].items()]
    return "\n".join(lines)


def profile_table(results):
    """Markdown of the per-op profiles (PERF_COUNT): top ops by time, grouped by op type and kernel."""
    lines = [f"# Per-op profile: {results['name']} ({results['model']}, {results['imgsz']} px, "
             f"{results['machine']['cpu']}, {results['machine']['int8']})", ""]
    for label, p in results.get("profile", {}).items():
        lines += [f"## {label}, batch {p['batch']}: {p['total_ms']:.1f} ms in all ops (per-node medians)", "",
                  "| op | kernel | count | ms | share |", "|---|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['kernel']} | {o['count']} | {o['ms']:.2f} | {o['share']:.1%} |" for o in p["ops"]]
        lines.append("")
    return "\n".join(lines)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results["batches"])
    labels = [k for k, r in results["batches"][batches[0]].items() if "latency_ms" in r and "speedup_vs_trt_fp16" not in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / max(len(labels), 1)
    for i, k in enumerate(labels):
        rows = [results["batches"][b].get(k, {}) for b in batches]
        bars = ax.bar(np.arange(len(batches)) + i * w, [r.get("imgs_per_s", 0) for r in rows], w, label=k)
        for bar, r in zip(bars, rows):
            ratio = r.get("vs_float", r.get("speedup"))
            if ratio:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + w / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
    ax.set_xticks(np.arange(len(batches)) + w * (len(labels) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("images / s (x: vs fastest float)")
    ax.set_title(f"{results['name']} {results['imgsz']} px, OpenVINO CPU ({results['machine']['int8']}), "
                 f"{results['threads']} threads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:])
    plt.close(fig)


def write(results, out):
    out = Path(out)
    name = results["name"]
    save_tables(out / name, table(results) + "\n", results)
    if results.get("profile"):
        with atomic_output(out / f"{name}-profile.md") as tmp:
            tmp.write_text(profile_table(results))
    chart(results, out / f"{name}.png")
    LOGGER.info("\n" + table(results) + f"\nwritten to {out}/{name}.{{md,json,png}}" +
                (f" and {name}-profile.md" if results.get("profile") else ""))


def layer_set(text):
    """'1,15,8' -> [1, 15, 8] (--float-layers)."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer indices, e.g. 1,15,8")
    return layers


def parse_opt(argv=None):
    p = ArgumentParser(description="FP32 vs QAT vs NNCF INT8 latency on OpenVINO (CPU)")
    p.add_argument("--cfg", default="models/detect/gelan-c.yaml", help="model yaml (random weights)")
    p.add_argument("--weights", default=None, help="QAT or plain checkpoint instead of random weights")
    p.add_argument("--data", default=None, help="dataset yaml: calibration images from its train split")
    p.add_argument("--imgsz", type=imgsz_int, default=640, help="image size")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 8], help="batch sizes to time")
    p.add_argument("--threads", type=positive_int, default=2, help="OpenVINO inference threads")
    p.add_argument("--iters", type=positive_int, default=5, help="timed calls per model per round")
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds (models take turns)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed calls per model first")
    p.add_argument("--calib-images", type=positive_int, default=8, help="calibration images (QAT model and NNCF)")
    p.add_argument("--no-nncf", dest="nncf", action="store_false", help="skip the NNCF peer")
    p.add_argument("--act-form", default="auto", choices=("auto", "int8", "uint8", "measure"),
                   help="deployed activation form: auto = by this CPU (rule, else timed)")
    p.add_argument("--vnni", default="auto", choices=("auto", "yes", "no"),
                   help="deployed weight bits: no -> 7-bit weights; auto = by this CPU")
    p.add_argument("--ir", default=None, help="also time this OpenVINO IR folder (export_qat.py --include openvino)")
    p.add_argument("--float-layers", type=layer_set, nargs="+", default=[], metavar="N,N",
                   help="also time the QAT model with these top-level layers float, one row per comma-separated "
                        "set (train_qat.py --auto-skip's sets), e.g. 1,15,8 12,22")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-op profile")
    p.add_argument("--name", default=None, help="results name (default: cfg or weights stem, -<isa> when capped)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    add_trusted_flag(p)
    return p.parse_args(argv)


main = cli_main(parse_opt, run, run_cli)  # main(argv=None)


if __name__ == "__main__":
    main()
