"""How closely the deployed INT8 engine (OpenVINO) agrees with the ONNX Runtime reference and the
PyTorch fake-quant model, and how much of a val mAP difference is plain noise.

    python benchmarks/bench_agreement.py --onnx runs/qat/demo/weights/qat_best.onnx \
        --weights runs/qat/demo/weights/qat_best.pt --data data/demo.yaml --imgsz 320

Why this exists: a quantized network is a chain of roundings. Two correct INT8 implementations
(PyTorch fake-quant, ONNX Runtime's float Q/DQ emulation, OpenVINO's integer kernels with fused
requantization) differ in the last bit of a few float results (exp in SiLU, summation order); a
value that lands on the other side of a rounding boundary becomes a one-step (1 LSB) flip, and
every later layer turns one flip into several. This script measures that chain and its effect:

1. mAP50-95 / mAP50 of ONNX Runtime (reference), the deployed OpenVINO model and, with --weights,
   the PyTorch fake-quant model, all on the same images through val.run;
2. the noise floor: --repeats reference runs on inputs perturbed by Gaussian noise of --sigma
   (1e-4 = 2.5 % of one 8-bit pixel step; it only moves input values that sit on a rounding
   boundary, the same kind of change as the implementations' last-bit differences): their mAP
   mean and standard deviation, and the deployed model's difference in units of that deviation;
3. output agreement on the anchors the reference is confident about (score > 0.25): box
   coordinate difference in pixels and class score difference, for each pair of models;
4. where the flips start: the fraction of activation values (after their Q/DQ) on which OpenVINO
   and ONNX Runtime differ by one quantization step or more, at --layers depths of the network.

Writes benchmarks/results/agreement-<name>.{md,json}.
"""
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.cli import (ArgumentParser, add_trusted_flag, imgsz_int, nonneg_int, positive_float,  # noqa: E402
                       positive_int)
from utils.general import LOGGER, UserError, check_img_size, print_args, run_cli  # noqa: E402
from utils.torch_utils import save_tables  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONF = 0.25  # anchors the reference is confident about


class Tap(nn.Module):
    """Wraps a backend or model for val.run: optional input noise, and keeps every raw output."""

    def __init__(self, model, sigma=0.0, seed=0):
        super().__init__()
        self.inner, self.sigma = model, sigma
        self.rng = np.random.default_rng(seed)
        self.stride, self.names = model.stride, model.names
        self.register_parameter("_host", nn.Parameter(torch.zeros(0), requires_grad=False))
        self.outputs = []

    def forward(self, im, augment=False, **kwargs):
        if self.sigma:
            im = im + torch.from_numpy(self.rng.normal(0.0, self.sigma, im.shape).astype(np.float32))
        y = self.inner(im)
        y = y[0] if isinstance(y, (list, tuple)) else y
        self.outputs.append(y.detach().float().cpu().numpy())
        return y


def activation_dq_outputs(graph):
    """[(DequantizeLinear output name, scale)] of the activation (not weight) Q/DQ pairs, in graph order."""
    from qat.graph import find_pairs

    return [(p.dq.outputs[0].name, float(np.max(p.scale))) for p in find_pairs(graph) if not p.weight]


def layer_flips(onnx_path, images, n_points, threads):
    """[{tensor, depth, flips, flips_gt1}] OpenVINO vs ONNX Runtime on activation tensors along the
    network: each cut is its own sub-model (input -> that DQ output), run on the same images."""
    import onnx.utils

    from qat.deploy import ONNXRuntimeBackend, OpenVINOBackend
    from qat.graph import import_graph

    graph = import_graph(str(onnx_path))
    acts, input_name = activation_dq_outputs(graph), graph.inputs[0].name
    picks = sorted({round(i) for i in np.linspace(0, len(acts) - 1, n_points)}) if acts else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(picks, desc="layer flips", leave=False):
            name, scale = acts[i]
            f = Path(tmp) / "cut.onnx"
            onnx.utils.extract_model(str(onnx_path), str(f), [input_name], [name])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ov = OpenVINOBackend(f, threads=threads, names=["x"], strides=[8, 16, 32])
                ort = ONNXRuntimeBackend(f, threads=threads, names=["x"], strides=[8, 16, 32])
            a = np.concatenate([ov._infer(x) for x, _ in ov._fit(images)])
            b = np.concatenate([ort._infer(x) for x, _ in ort._fit(images)])
            steps = np.abs(a - b) / scale
            rows.append({"tensor": name, "depth": i, "of": len(acts), "flips": float(np.mean(steps > 0.5)),
                         "flips_gt1": float(np.mean(steps > 1.5)), "max_steps": float(steps.max())})
    return rows


def output_agreement(a, ref):
    """Box (px) and class-score differences on anchors where `ref` is confident."""
    conf = ref[:, 4:].max(1)  # (N, A)
    mask = conf > CONF
    box = np.abs(a - ref)[:, :4].transpose(0, 2, 1)[mask]
    cls = np.abs(a - ref)[:, 4:].transpose(0, 2, 1)[mask]
    if box.size == 0:
        return {"anchors": 0}
    return {"anchors": int(mask.sum()), "box_mean_px": float(box.mean()), "box_p99_px": float(np.percentile(box, 99)),
            "box_max_px": float(box.max()), "score_mean": float(cls.mean()), "score_max": float(cls.max())}


def run(onnx, data, weights=None, imgsz=None, batch_size=8, repeats=6, sigma=1e-4, layers=8, layer_images=8,
        threads=1, workers=2, name=None, trusted=False):
    import val as validate
    from qat.deploy import load_backend, require_qdq
    from qat.graph import metadata
    from utils.dataloaders import create_dataloader
    from utils.general import check_dataset

    onnx = Path(onnx)
    if not onnx.is_file():
        raise UserError(f"--onnx {onnx} not found; export one with export_qat.py")
    require_qdq(onnx)
    if repeats < 2:
        raise UserError(f"--repeats {repeats}: need at least 2 perturbed runs for a standard deviation")
    meta = metadata(onnx)
    imgsz = check_img_size(imgsz or int(max(meta.get("imgsz") or [640])), s=32)
    data = check_dataset(data, required=("val",))
    loader = create_dataloader(data["val"], imgsz, batch_size, 32, pad=0.0, rect=False, workers=workers,
                               prefix="val: ")[0]
    t0 = time.time()

    def evaluate(model, sigma=0.0, seed=0):
        tap = Tap(model, sigma, seed)
        (_, _, m50, m, *_), _, _ = validate.run(data, batch_size=batch_size, imgsz=imgsz, model=tap, dataloader=loader,
                                                plots=False, half=False)
        return {"mAP50": float(m50), "mAP50-95": float(m)}, np.concatenate(tap.outputs)

    ref_backend = load_backend("onnxruntime", onnx, threads=threads)
    deployed = load_backend("openvino", onnx, threads=threads)
    models = {}
    models["ONNX Runtime (reference)"] = evaluate(ref_backend)
    models["OpenVINO INT8 (deployed)"] = evaluate(deployed)
    if weights:
        from qat.checkpoint import load_qat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel, _, _ = load_qat(weights, device=torch.device("cpu"), trusted=trusted)
        models["PyTorch QAT fake-quant"] = evaluate(qmodel)
    noisy = [evaluate(ref_backend, sigma, seed=k + 1)[0]["mAP50-95"]
             for k in tqdm(range(repeats), desc="noise floor")]
    ref_map = models["ONNX Runtime (reference)"][0]["mAP50-95"]
    mean, std = float(np.mean(noisy)), float(np.std(noisy, ddof=1))
    ref_out = models["ONNX Runtime (reference)"][1]
    rows = []
    for label, (metrics, out) in models.items():
        d = metrics["mAP50-95"] - ref_map
        rows.append({"model": label, **metrics, "delta_vs_reference": d,
                     "delta_vs_noise_mean_in_std": (metrics["mAP50-95"] - mean) / std if std > 0 else None,
                     "outputs_vs_reference": output_agreement(out, ref_out) if label != "ONNX Runtime (reference)"
                     else None})
    images = torch.cat([im for im, *_ in _first_batches(loader, layer_images)])[:layer_images].float() / 255
    flips = layer_flips(onnx, images, layers, threads) if layers > 0 else []
    result = {"name": name or onnx.stem, "onnx": str(onnx), "data": str(data.get("yaml_file", "")),
              "images": len(loader.dataset), "imgsz": imgsz, "date": datetime.now().isoformat(timespec="seconds"),
              "rows": rows, "noise": {"repeats": repeats, "sigma": sigma, "mAP50-95": noisy, "mean": mean, "std": std},
              "layer_flips": flips, "seconds": time.time() - t0}
    return result


def _first_batches(loader, n):
    seen = 0
    for batch in loader:
        yield batch
        seen += batch[0].shape[0]
        if seen >= n:
            break


def to_markdown(r):
    nz = r["noise"]
    lines = [f"# Deployment agreement ({r['name']}): {Path(r['onnx']).name}, {r['images']} val images, {r['imgsz']} px",
             "", f"{r['date']}; `python benchmarks/bench_agreement.py` ({r['seconds']:.0f} s)", "",
             "| model | mAP50-95 | mAP50 | vs reference | vs noise mean (std) | box diff px mean / p99 / max "
             "| score diff mean |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        o = row["outputs_vs_reference"] or {}
        diff = (f"{o['box_mean_px']:.3f} / {o['box_p99_px']:.2f} / {o['box_max_px']:.1f}" if o.get("anchors")
                else "-")
        score = f"{o['score_mean']:.5f}" if o.get("anchors") else "-"
        z = row["delta_vs_noise_mean_in_std"]
        lines.append(f"| {row['model']} | {row['mAP50-95']:.4f} | {row['mAP50']:.4f} | "
                     f"{row['delta_vs_reference']:+.4f} | {'-' if z is None else f'{z:+.1f}'} | {diff} | {score} |")
    lines += ["", f"Noise floor: {nz['repeats']} reference runs on inputs + N(0, {nz['sigma']:g}): mAP50-95 "
                  f"{nz['mean']:.4f} +- {nz['std']:.4f} (min {min(nz['mAP50-95']):.4f}, max "
                  f"{max(nz['mAP50-95']):.4f}). Differences between correct INT8 implementations are of this size; "
                  f"more val images shrink it (about 1/sqrt(images))."]
    if r["layer_flips"]:
        lines += ["", "OpenVINO vs ONNX Runtime, activation values one quantization step or more apart:", "",
                  "| activation (depth) | differ by >= 1 step | by >= 2 steps | max steps |", "|---|---|---|---|"]
        for f in r["layer_flips"]:
            lines.append(f"| {f['tensor'][:60]} ({f['depth']}/{f['of']}) | {f['flips']:.5f} | {f['flips_gt1']:.5f} "
                         f"| {f['max_steps']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_opt(argv=None):
    p = ArgumentParser(description="OpenVINO INT8 vs ONNX Runtime vs fake-quant agreement and mAP noise floor")
    p.add_argument("--onnx", required=True, help="Q/DQ ONNX from export_qat.py")
    p.add_argument("--weights", default="", help="its QAT checkpoint (adds the PyTorch fake-quant row)")
    p.add_argument("--data", default=str(ROOT / "data/demo.yaml"), help="dataset yaml")
    p.add_argument("--imgsz", type=imgsz_int, default=None, help="default: the ONNX's")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=6, help="perturbed reference runs for the noise floor")
    p.add_argument("--sigma", type=positive_float, default=1e-4, help="input noise of the perturbed runs (input in 0-1)")
    p.add_argument("--layers", type=nonneg_int, default=8, help="depths at which to count flips (0 = skip)")
    p.add_argument("--layer-images", type=positive_int, default=8, help="images for the flip counts")
    p.add_argument("--threads", type=positive_int, default=1, help="runtime threads")
    p.add_argument("--workers", type=nonneg_int, default=2, help="dataloader workers")
    p.add_argument("--name", default=None, help="results name (default: the ONNX's stem)")
    add_trusted_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    opt = parse_opt(argv)
    print_args(vars(opt))
    r = run(opt.onnx, opt.data, weights=opt.weights or None, imgsz=opt.imgsz, batch_size=opt.batch_size,
            repeats=opt.repeats, sigma=opt.sigma, layers=opt.layers, layer_images=opt.layer_images,
            threads=opt.threads, workers=opt.workers, name=opt.name, trusted=opt.trusted)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"agreement-{r['name']}"
    text = to_markdown(r)
    save_tables(stem, text, r)
    LOGGER.info("\n" + text + f"Saved {stem}.md and .json")


if __name__ == "__main__":
    run_cli(main)
