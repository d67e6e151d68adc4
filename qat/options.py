"""train_qat.py's options: the CLI schema and the checks on it, one source for train_qat.py,
`train.py --qat` (run_from_train takes these defaults for what train.py's CLI lacks) and the
installer's hook. Nothing here loads a model or data."""
import argparse
import math
from pathlib import Path

import yaml

from qat.compat import UserError
from qat.distributed import WORLD_SIZE
from qat.finetune import LOSSES, OPTIMIZERS, RECIPES, SCHEDULES
from qat.settings import CALIB_METHODS, WEIGHT_BITS, QuantSettings
from utils.cli import (add_device_arg, add_trusted_flag, float_range, imgsz_int, nonneg_float, nonneg_int,
                       positive_float, positive_int)
from utils.general import yaml_load

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = str(ROOT / "weights/demo-gelan.pt")
DEFAULT_DATA = str(ROOT / "data/demo.yaml")
DEFAULT_HYP = str(ROOT / "data/hyps/hyp.qat.yaml")


def add_common_args(p):
    p.add_argument("--weights", type=str, default=DEFAULT_WEIGHTS, help="FP32 checkpoint to quantize")
    p.add_argument("--data", type=str, default=DEFAULT_DATA, help="dataset.yaml path")
    p.add_argument("--hyp", type=str, default=DEFAULT_HYP, help="loss gains (--loss det/both) and augmentation")
    p.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=None,
                   help="image size (default: the checkpoint's training size, else 640)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="total batch size for all ranks")
    add_device_arg(p, default="")
    p.add_argument("--workers", type=nonneg_int, default=8, help="max dataloader workers (per rank)")
    p.add_argument("--project", default=str(ROOT / "runs/qat"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--seed", type=nonneg_int, default=0, help="global seed")
    add_trusted_flag(p)
    p.add_argument("--val-batches", type=nonneg_int, default=0,
                   help="evaluate on the first N val batches only (0: all)")
    # quantization
    p.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=8,
                   help="8, or 7 for CPUs without VNNI (DESIGN.md section 5)")
    p.add_argument("--calib-method", default="auto", choices=CALIB_METHODS,
                   help=f"activation calibration: {' | '.join(CALIB_METHODS)}; auto: the best PTQ mAP50-95 on the "
                        f"selection split among max, percentile 99.9/99.99/99.999, mse, entropy")
    p.add_argument("--percentile", type=float_range(0.0, 100.0, lo_open=True), default=99.99,
                   help="percentile for --calib-method percentile")
    p.add_argument("--select-split", default="", metavar="PATH",
                   help="images (folder or .txt list, YOLO labels beside) to choose calibration and the QAT "
                        "model on, or a data yaml key; default: the data yaml's 'select:' split, else "
                        "--select-images train images held out of training")
    p.add_argument("--select-images", type=positive_int, default=200,
                   help="train images held out as the selection split when there is no --select-split and no "
                        "'select:' in the data yaml")
    p.add_argument("--calib-batches", type=positive_int, default=32,
                   help="calibration batches (train images, all ranks)")
    p.add_argument("--no-last-layer", action="store_true", help="keep the detection head (model.model[-1]) float")
    p.add_argument("--residual-quant", default="both", choices=("both", "shortcut"),
                   help="RepNBottleneck residual Add: quantize both inputs, or only the shortcut (TensorRT's guide)")
    p.add_argument("--skip-layers", nargs="+", default=[], metavar="REGEX",
                   help="keep modules whose quantizer names match in float, e.g. '^model\\.22\\.'")
    p.add_argument("--auto-skip", type=nonneg_float, default=None, metavar="BUDGET",
                   help="keep the fewest layers float so that mAP50-95 >= FP32 - BUDGET (per-layer sensitivity)")
    return p

def add_finetune_args(p):
    p.add_argument("--epochs", type=nonneg_int, default=10, help="QAT epochs (0: post-training quantization only)")
    p.add_argument("--iters-per-epoch", type=nonneg_int, default=200,
                   help="iterations per epoch (0: one pass of the data)")
    p.add_argument("--recipe", default="layers", choices=tuple(RECIPES),
                   help="QAT recipe (qat/finetune.py); it sets the defaults of --lr --lrf --optimizer --schedule "
                        "--warmup")
    p.add_argument("--lr", type=positive_float, default=None, help="initial learning rate (default: the recipe's)")
    p.add_argument("--lrf", type=nonneg_float, default=None,
                   help="cosine: final learning rate fraction (default: the recipe's)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="default: the recipe's")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="default: the recipe's")
    p.add_argument("--warmup", type=float_range(0.0, 1.0, hi_open=True), default=None,
                   help="linear warm-up, fraction of all iterations")
    p.add_argument("--bias-correction", type=nonneg_int, nargs="?", const=32, default=0, metavar="IMAGES",
                   help="after calibration, shift each convolution's bias by the per-channel mean of FP32 minus "
                        "quantized output, layer by layer (empirical bias correction), on IMAGES calibration "
                        "images (default 32) in one forward pass; 0: off")
    p.add_argument("--learn-ranges", action=argparse.BooleanOptionalAction, default=None,
                   help="train the activation amaxes too (LSQ, initialised from calibration; weights keep "
                        "per-channel max); default: the recipe's (layers: on)")
    p.add_argument("--range-lr-mult", type=positive_float, default=None,
                   help="learned ranges: their lr = --lr x this (steps act on log(amax)); default: 3e-2 / --lr")
    p.add_argument("--temperature", type=positive_float, default=2.0, help="--recipe kd: softening temperature")
    p.add_argument("--eval-period", type=nonneg_int, default=0,
                   help="evaluate on the selection split every N iterations (0: at each epoch end)")
    p.add_argument("--momentum", type=float_range(0.0, 1.0, hi_open=True), default=0.9,
                   help="SGD momentum / Adam beta1")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="weight decay")
    p.add_argument("--loss", default="distill", choices=LOSSES,
                   help="distill (vs FP32, no labels) | det (labels) | both")
    p.add_argument("--det-weight", type=nonneg_float, default=1e-3,
                   help="--loss both: distill + det_weight * det (det per image is ~1000x the distill MSE)")
    p.add_argument("--supervision-stride", type=positive_int, default=1,
                   help="distill every N-th layer's output (+ head)")
    p.add_argument("--save-period", type=nonneg_int, default=100, help="also write qat_last.pt every N iterations")
    p.add_argument("--augment", action="store_true", help="train-time augmentation from --hyp (default: none)")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue a run from its qat_last.pt")
    p.add_argument("--no-eval-origin", action="store_true", help="skip evaluating the FP32 model")
    p.add_argument("--no-eval-ptq", action="store_true", help="skip evaluating the calibrated (PTQ) model")
    return p

def default_opt():
    p = add_finetune_args(add_common_args(argparse.ArgumentParser()))
    return p.parse_args([])

def settings_from_opt(opt):
    return QuantSettings(weight_bits=opt.weight_bits, calib_method=opt.calib_method, percentile=opt.percentile,
                         no_last_layer=opt.no_last_layer, skip_layers=list(opt.skip_layers or []),
                         residual_quant=getattr(opt, "residual_quant", "both"))

def finetune_options(opt, save_dir, settings):
    from qat.finetune import FinetuneOptions
    f = FinetuneOptions(epochs=opt.epochs, iters_per_epoch=opt.iters_per_epoch, recipe=opt.recipe, lr=opt.lr,
                        lrf=opt.lrf, optimizer=opt.optimizer, schedule=opt.schedule, warmup=opt.warmup,
                        momentum=opt.momentum, weight_decay=opt.weight_decay, loss=opt.loss,
                        det_weight=opt.det_weight, supervision_stride=opt.supervision_stride,
                        temperature=opt.temperature, eval_period=opt.eval_period,
                        learn_ranges=getattr(opt, "learn_ranges", None),
                        range_lr_mult=getattr(opt, "range_lr_mult", None),
                        save_dir=Path(save_dir) / "weights", save_period=opt.save_period,
                        settings=settings).validate()
    # left unset, they are the recipe's: written back so that opt.yaml and report.md say what ran
    opt.learn_ranges, opt.range_lr_mult = f.learn_ranges, f.range_lr_mult
    return f

def check_opt(opt):
    """Everything that can be wrong with the options alone, before anything is loaded."""
    settings = settings_from_opt(opt)
    if hasattr(opt, "epochs"):  # not for `sensitive`
        finetune_options(opt, ".", settings)
    if opt.batch_size < 1:
        raise UserError(f"--batch-size {opt.batch_size} must be >= 1")
    if opt.calib_batches < 1:
        raise UserError(f"--calib-batches {opt.calib_batches} must be >= 1")
    if not opt.select_split and opt.select_images < 1:
        raise UserError(f"--select-images {opt.select_images} must be >= 1 (or pass --select-split): choices are "
                        f"never made on the reported val split")
    if opt.auto_skip is not None and not 0 <= opt.auto_skip < 1:
        raise UserError(f"--auto-skip {opt.auto_skip}: the budget is an mAP50-95 difference in [0, 1), e.g. 0.001")
    if WORLD_SIZE > 1 and opt.batch_size % WORLD_SIZE:
        raise UserError(f"--batch-size {opt.batch_size} must be a multiple of the {WORLD_SIZE} DDP processes")
    return settings

def load_hyp(hyp, required=(), start_from=DEFAULT_HYP):
    """--hyp (a yaml path or a dict) -> dict. Keys in `required` must be there; every value must be
    a finite number (the loss gains and augmentation settings all are)."""
    where = "--hyp" if isinstance(hyp, dict) else f"--hyp {hyp}"
    if not isinstance(hyp, dict):
        path = Path(hyp)
        if not path.is_file() and (ROOT / hyp).is_file():
            path = ROOT / hyp
        if not path.is_file():
            raise UserError(f"--hyp {hyp} not found: pass a hyperparameter yaml such as {DEFAULT_HYP}")
        try:  # (not utils.general.yaml_load_mapping: in an upstream clone utils.general is upstream's)
            hyp = yaml_load(path)
        except yaml.YAMLError as e:
            raise UserError(f"--hyp {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(hyp, dict):
            raise UserError(f"--hyp {path} must hold a mapping of hyperparameters")
    hyp = dict(hyp)
    missing = [k for k in required if k not in hyp]
    if missing:
        raise UserError(f"{where} misses {', '.join(missing)}: start from {start_from}")
    for k, v in hyp.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: {k}={v!r} is not a finite number")
    return hyp

def plain_opt(opt):
    """The options as plain yaml-able values (opt.yaml, the checkpoint's 'opt')."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items() if k != "results"}
