"""Time one QAT iteration against one FP32 training iteration (same model, batch, device).

    python -m qat.speed --cfg models/detect/gelan-c.yaml --imgsz 640 --batch-size 16 --device 0
    python -m qat.speed --weights best.pt --imgsz 320 --batch-size 8 --device cpu

FP32 step: train-mode forward of the unfused model, detection loss, backward, optimizer step (what
train.py does per batch, without data loading and AMP). QAT steps: qat.finetune.Trainer.step on the
fused, quantized, calibrated model: distillation (student forward + backward and the frozen FP32
teacher's forward) with the default recipe (learned activation ranges) and with fixed ranges, and the
detection loss. The four steps take turns; median of --iters timed rounds after --warmup.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from copy import deepcopy

import torch

from qat.compat import UserError, atomic_output, load_checkpoint, run_cli
from qat.timing import take_turns


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fp32_step(model, batch):
    """What train.py does per batch: forward, detection loss, backward, optimizer step."""
    from utils.loss_tal import ComputeLoss

    fp32 = deepcopy(model).train()
    for p in fp32.parameters():
        p.requires_grad_(True)
    compute_loss = ComputeLoss(fp32)
    opt = torch.optim.SGD(fp32.parameters(), lr=1e-5, momentum=0.9)

    def step():
        loss, _ = compute_loss(fp32(batch[0].float() / 255), batch[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(model, imgsz=640, batch_size=16, device="cpu", iters=10, warmup=3, loss="distill"):
    """-> dict of median seconds per iteration: fp32, qat (and qat_det) and their ratios.
    `model`: an unfused (trainable) DetectionModel."""
    from qat.calibrate import calibrate
    from qat.finetune import FinetuneOptions, Trainer
    from qat.quantize import quantize_model
    from qat.settings import QuantSettings

    device = torch.device(device)
    model = model.to(device).float()
    model.hyp = {"box": 7.5, "cls": 0.5, "dfl": 1.5, "cls_pw": 1.0}
    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(batch_size, 3, imgsz, imgsz, generator=g) * 255).to(torch.uint8).to(device)
    nc = int(model.model[-1].nc)
    n = 4 * batch_size
    targets = torch.cat([torch.arange(batch_size).repeat(4)[:n, None].float(),
                         torch.randint(0, nc, (n, 1), generator=g).float(),
                         torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1)
    batch = (imgs, targets.to(device), None, None)

    teacher = deepcopy(model).fuse().eval()
    q = quantize_model(deepcopy(teacher), QuantSettings())
    calibrate(q, [imgs.float() / 255], show=False)
    q.hyp = model.hyp
    steps = {"fp32": _fp32_step(model, batch)}
    # the default recipe (learned ranges on), the same with calibrated ranges kept fixed, the det loss
    trainers = {}
    for kind, extra in (("distill", {}), ("distill_fixed", {"loss": "distill", "learn_ranges": False}), ("det", {})):
        trainers[kind] = t = Trainer(deepcopy(q), deepcopy(teacher), FinetuneOptions(**({"loss": kind} | extra)))
        steps[f"qat_{kind}"] = lambda t=t: t.step(batch, t.opts.lr)
    try:
        times = take_turns(steps, iters, warmup=warmup, sync=lambda: _sync(device))
        out = {"device": str(device), "imgsz": imgsz, "batch_size": batch_size,
               **{name: statistics.median(t) for name, t in times.items()}}
    finally:
        for t in trainers.values():
            t.close()
    for kind in trainers:
        out[f"qat_{kind}_vs_fp32"] = out[f"qat_{kind}"] / out["fp32"]
    return out


def machine(device):
    """Where it ran: the CPU (or GPU), torch's threads, torch."""
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        from qat.deploy.cpu import read_cpuinfo
        name = read_cpuinfo()[0] or platform.processor() or platform.machine()
    return {"device": name, "torch_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
            "torch": torch.__version__}


def table(r):
    return ("| step | ms / iteration | vs FP32 training |\n|---|---|---|\n"
            f"| FP32 training (det loss) | {r['fp32'] * 1e3:.1f} | 1.00x |\n"
            f"| QAT, distillation (default) | {r['qat_distill'] * 1e3:.1f} | {r['qat_distill_vs_fp32']:.2f}x |\n"
            f"| QAT, distillation, calibrated ranges fixed (--no-learn-ranges) | {r['qat_distill_fixed'] * 1e3:.1f} "
            f"| {r['qat_distill_fixed_vs_fp32']:.2f}x |\n"
            f"| QAT, det loss | {r['qat_det'] * 1e3:.1f} | {r['qat_det_vs_fp32']:.2f}x |\n")


def main(argv=None):
    p = argparse.ArgumentParser(description="QAT vs FP32 training time per iteration")
    p.add_argument("--cfg", default="models/detect/gelan-t.yaml", help="model yaml (random weights)")
    p.add_argument("--weights", default="", help="or a checkpoint (its model is used)")
    p.add_argument("--nc", type=int, default=80)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, 0, cuda:0")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="", help="also write the result here")
    opt = p.parse_args(argv)
    if opt.weights:
        ckpt = load_checkpoint(opt.weights)
        model = (ckpt.get("ema") or ckpt["model"]).float()
        if model.is_fused():
            raise UserError(f"{opt.weights} holds a fused model; pass a training checkpoint or --cfg")
    else:
        from models.yolo import DetectionModel
        model = DetectionModel(opt.cfg, nc=opt.nc)
    device = "cuda:" + opt.device if opt.device.isdigit() else opt.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opt.device} asks for CUDA but none is available: use --device cpu")
    r = measure(model, opt.imgsz, opt.batch_size, device, opt.iters, opt.warmup)
    r["model"] = opt.weights or opt.cfg
    r["command"] = "python -m qat.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    r["machine"] = machine(device)
    r["date"] = time.strftime("%Y-%m-%d")
    print(table(r))
    if opt.json:
        with atomic_output(opt.json) as tmp:
            tmp.write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    run_cli(main)
