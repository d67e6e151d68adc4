"""CPU latency / throughput of one network as FP32 ONNX, QAT (Q/DQ) ONNX and NNCF post-training INT8,
all on OpenVINO, measured side by side in one run (DESIGN.md section 5).

    python benchmarks/bench_latency.py --cfg models/detect/gelan-c.yaml --imgsz 640 --threads 2
    python benchmarks/bench_latency.py --weights runs/qat/exp/weights/qat_best.pt --data data/demo.yaml

Without --weights the network has random weights (speed does not depend on them) and the QAT model
is the same network quantized by qat.quantize + qat.calibrate on a few images (random ones, or
--data's). With a QAT checkpoint its float copy is the FP32 model; with a plain one the QAT model is
made from it the same way. The NNCF peer is nncf.quantize on the FP32 OpenVINO model with the same
calibration images. Every model is compiled with INFERENCE_PRECISION_HINT f32 (float layers in f32,
whatever the CPU's bf16 support) and `--threads` threads; the models take turns, round by round, so
load changes on a shared machine hit them alike. Reports: latency (median ms per call) and
throughput (images/s) at each batch size, INT8 vs float convolutions of OpenVINO's runtime model,
model sizes (FP32 / FP16 .pt, INT8 IR), written to benchmarks/results/<name>.{md,json,png}.
`python benchmarks/make_readme.py` turns the results into the README's results section.
"""
import json
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

from utils.cli import ArgumentParser, imgsz_int, nonneg_int, positive_int  # noqa: E402
from utils.general import LOGGER, UserError, check_img_size, print_args, run_cli  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def machine():
    """One line about the CPU and the runtimes."""
    import openvino as ov

    from qat.deploy import cpu_int8_features

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    f = cpu_int8_features()
    vnni = {True: "VNNI/AMX: " + "/".join(f["flags"]), False: "no VNNI/AMX", None: "VNNI unknown"}[f["vnni"]]
    return {"cpu": name, "logical_cpus": os.cpu_count(), "int8": vnni, "openvino": ov.__version__,
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


def _conv_precisions(compiled):
    int8 = flt = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "onvolution" in str(info["layerType"].astype(str)):
            prec = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else ""
            int8, flt = (int8 + 1, flt) if prec in ("u8", "i8") else (int8, flt + 1)
    return int8, int8 + flt


def _compile(ov_model, batch, imgsz, threads):
    import openvino as ov

    m = ov_model.clone()
    m.reshape({m.inputs[0].get_any_name(): [batch, 3, imgsz, imgsz]})
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    return ov.Core().compile_model(m, "CPU", cfg)


def time_models(models, batch, imgsz, threads, iters, rounds, warmup):
    """{label: [seconds per call]}: the compiled models take turns, `iters` calls each per round."""
    compiled = {k: _compile(m, batch, imgsz, threads) for k, m in models.items()}
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    reqs = {k: c.create_infer_request() for k, c in compiled.items()}
    for r in reqs.values():
        for _ in range(warmup):
            r.infer({0: x})
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, r in reqs.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                r.infer({0: x})
                times[k].append(time.perf_counter() - t0)
    convs = {k: _conv_precisions(c) for k, c in compiled.items()}
    return times, convs


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


def run(cfg="models/detect/gelan-c.yaml", weights=None, data=None, imgsz=640, batch_sizes=(1, 4, 8), threads=2,
        iters=5, rounds=4, warmup=2, calib_images=8, nncf=True, name=None, out=RESULTS, trusted=False):
    import openvino as ov

    from qat.deploy import OpenVINOBackend
    from qat.export import export_qat_onnx
    from qat.lint import lint

    imgsz = check_img_size(imgsz, s=32)
    if not weights and not Path(cfg).is_file():
        raise UserError(f"--cfg {cfg} not found; pass a model yaml (models/detect/*.yaml) or --weights")
    name = name or (Path(weights).stem if weights else Path(cfg).stem)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    LOGGER.info(f"benchmark {name}: {info}")
    calib = _calibration(data, imgsz, calib_images)
    t0 = time.time()
    fp32, qmodel, desc = build_models(cfg, weights, imgsz, calib, trusted)
    LOGGER.info(f"models ready ({time.time() - t0:.0f} s): {desc}")

    with tempfile.TemporaryDirectory() as tmp:
        f_onnx, q_onnx = Path(tmp) / "fp32.onnx", Path(tmp) / "qat.onnx"
        t0 = time.time()
        export_qat_onnx(fp32, f_onnx, imgsz, batch_size=1, dynamic=True)
        export_qat_onnx(qmodel, q_onnx, imgsz, batch_size=1, dynamic=True)
        violations = lint(q_onnx)
        LOGGER.info(f"exported ({time.time() - t0:.0f} s); qat.lint: {len(violations)} violation(s)")
        qat_backend = OpenVINOBackend(q_onnx, threads=threads, input_shape=[1, 3, imgsz, imgsz])
        models = {"FP32 ONNX": ov.Core().read_model(str(f_onnx)), "QAT Q/DQ ONNX (u8 form)": qat_backend.ov_model}
        if nncf:
            t0 = time.time()
            models["NNCF PTQ INT8"] = nncf_quantize(f_onnx, calib, imgsz)
            LOGGER.info(f"NNCF quantized ({time.time() - t0:.0f} s)")
        sizes = _sizes(fp32, {k: v for k, v in models.items() if k != "FP32 ONNX"}, tmp)

        results = {"name": name, "model": desc, "imgsz": imgsz, "threads": threads, "machine": info,
                   "date": datetime.now().isoformat(timespec="seconds"), "lint_violations": len(violations),
                   "qat_weights": "re-quantized to 7 bits" if qat_backend.weights_requantized else
                   f"up to ±{qat_backend.weight_max_q}", "sizes_mb": sizes, "batches": {}}
        for b in batch_sizes:
            LOGGER.info(f"timing batch {b}: {len(models)} models x {rounds} rounds x {iters} calls...")
            times, convs = time_models(models, b, imgsz, threads, iters, rounds, warmup)
            rows = {}
            for k in models:
                med = statistics.median(times[k])
                rows[k] = {"latency_ms": med * 1e3, "imgs_per_s": b / med, "int8_convs": convs[k][0],
                           "convs": convs[k][1]}
            base = rows["FP32 ONNX"]["latency_ms"]
            for r in rows.values():
                r["speedup"] = base / r["latency_ms"]
            results["batches"][str(b)] = rows
        trt = time_tensorrt(f_onnx, q_onnx, batch_sizes, imgsz, iters * rounds, warmup, Path(tmp), sizes)
        for b, rows in trt.items():
            results["batches"][str(b)].update(rows)
    write(results, out)
    return results


def table(results):
    """Markdown table of one result dict."""
    lines = [f"**{results['model']}**, {results['imgsz']} px, OpenVINO {results['machine']['openvino']}, "
             f"{results['threads']} threads, {results['machine']['cpu']} ({results['machine']['int8']}), "
             f"{results['date']}", "",
             "| model | batch | latency ms | images/s | vs FP32 | convolutions in INT8 |", "|---|---|---|---|---|---|"]
    for b, rows in results["batches"].items():
        for k, r in rows.items():
            ratio = f"{r['speedup']:.2f}x" if "speedup" in r else f"{r['speedup_vs_trt_fp16']:.2f}x TRT FP16"
            convs = f"{r['int8_convs']}/{r['convs']}" if r.get("convs") else "-"
            lines.append(f"| {k} | {b} | {r['latency_ms']:.1f} | {r['imgs_per_s']:.2f} | {ratio} | {convs} |")
    lines += ["", "| file | MB |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in results["sizes_mb"].items()]
    return "\n".join(lines)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(results["batches"])
    labels = [k for k, r in results["batches"][batches[0]].items() if "speedup" in r]  # the OpenVINO rows
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(labels)
    for i, k in enumerate(labels):
        vals = [results["batches"][b][k]["imgs_per_s"] for b in batches]
        bars = ax.bar(np.arange(len(batches)) + i * w, vals, w, label=k)
        for bar, b in zip(bars, batches):
            ax.annotate(f"{results['batches'][b][k]['speedup']:.2f}x", (bar.get_x() + w / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(batches)) + w * (len(labels) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("images / s")
    ax.set_title(f"{results['name']} {results['imgsz']} px, OpenVINO CPU, {results['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results, out):
    out = Path(out)
    (out / f"{results['name']}.json").write_text(json.dumps(results, indent=1))
    (out / f"{results['name']}.md").write_text(table(results) + "\n")
    chart(results, out / f"{results['name']}.png")
    LOGGER.info("\n" + table(results) + f"\nwritten to {out}/{results['name']}.{{md,json,png}}")


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
    p.add_argument("--name", default=None, help="results name (default: cfg or weights stem)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--trusted", action="store_true", help="load a checkpoint outside the safe-load allow-list")
    return p.parse_args(argv)


def main(argv=None):
    def _main():
        opt = parse_opt(argv)
        print_args(vars(opt))
        return run(**vars(opt))

    return run_cli(_main)


if __name__ == "__main__":
    main()
