"""Quantization-aware training of a YOLOv9 / GELAN model, quantized the way TensorRT runs it.

    python train_qat.py                                          # demo checkpoint + demo data
    python train_qat.py --weights yolov9-c-converted.pt --data data/coco.yaml --imgsz 640
    python train_qat.py --weights best.pt --data data.yaml --epochs 0              # PTQ only
    python train_qat.py --weights best.pt --data data.yaml --weight-bits 7         # CPUs without VNNI
    python train_qat.py --recipe blocks --eval-period 50 --select-split data/holdout.txt
    python train_qat.py --resume                                 # continue the latest run
    torchrun --nproc_per_node 2 train_qat.py --weights best.pt --data data.yaml   # DDP
    python train_qat.py sensitive --weights best.pt --data data.yaml [--auto-skip 0.001]

Stages (qat/pipeline.py): evaluate FP32 -> insert Q/DQ quantizers with shared scales (qat.quantize,
qat.rules) -> calibrate (qat.calibrate) -> evaluate PTQ -> fine-tune with self-distillation
against the FP32 model (qat.finetune) -> FP32 vs PTQ vs QAT report. Results in runs/qat/<name>/:
weights/qat_best.pt (best mAP50-95 on the selection split: --select-split, else the data yaml's
`select:`, else --select-images train images held out; never the reported val split), weights/qat_last.pt, calibration.md/json
(--calib-method auto, the default: calibration_selection.md/json), report.md/json (val numbers).
Export the result with export_qat.py.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch.distributed as dist  # noqa: E402

from qat.compat import UserError, run_cli  # noqa: E402
from utils.cli import ArgumentParser  # noqa: E402
from qat.distributed import LOCAL_RANK, setup_ddp  # noqa: E402
from qat.options import add_common_args, add_finetune_args  # noqa: E402
from qat.pipeline import run, run_sensitivity  # noqa: E402



def parse_opt(argv=None):
    """`[sensitive] [options]` -> Namespace with `command` = 'qat' or 'sensitive'."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "qat"
    if argv and argv[0] == "sensitive":
        command, argv = "sensitive", argv[1:]
    p = ArgumentParser(prog="train_qat.py" + (" sensitive" if command == "sensitive" else ""),
                       description="YOLOv9 quantization-aware training (TensorRT-style INT8 Q/DQ)",
                       epilog=None if command == "sensitive" else
                       "subcommand: train_qat.py sensitive [options]: rank the layers by the mAP50-95 they "
                       "recover when kept float (--auto-skip BUDGET: the float set for a budget); "
                       "train_qat.py sensitive --help lists its options")
    add_common_args(p)
    if command == "qat":
        add_finetune_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    opt.command = command
    return opt


def main(opt):
    if opt.command == "sensitive":
        return run_sensitivity(opt)
    device = setup_ddp(opt.device, batch_size=opt.batch_size)
    try:
        return run(opt, device=device)
    finally:
        if LOCAL_RANK != -1 and dist.is_initialized():
            dist.destroy_process_group()


def run_api(**kwargs):
    """Python entry point: `train_qat.run_api(weights=..., data=..., epochs=1)`; keyword names are the
    CLI's long options with '_' for '-' (command='sensitive' for the sensitivity analysis)."""
    opt = parse_opt(["sensitive"] if kwargs.pop("command", "qat") == "sensitive" else [])
    unknown = [k for k in kwargs if not hasattr(opt, k)]
    if unknown:
        raise UserError(f"train_qat.run_api: unknown option(s) {', '.join(unknown)}")
    for k, v in kwargs.items():
        setattr(opt, k, v)
    return main(opt)


if __name__ == "__main__":
    run_cli(lambda: main(parse_opt()))
