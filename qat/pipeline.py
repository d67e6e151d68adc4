"""The QAT stages end to end, shared by `train_qat.py` and `train.py --qat` (run_from_train).

    FP32 checkpoint -> evaluate (FP32 row) -> quantize_model -> calibrate (calibration.md/json;
    --calib-method auto: every rule's amax from one histogram pass, the best PTQ mAP50-95 on the
    selection split wins, calibration_selection.md/json)
    [-> --auto-skip: per-layer sensitivity, layers kept float, re-quantize + re-calibrate]
    -> evaluate (PTQ row) -> finetune (QAT, --recipe, evaluated on the selection split every
    --eval-period iterations) -> qat_best.pt evaluated on val -> report.md / report.json

Selection never uses the reported split: choices (calibration rule, best QAT evaluation) are made
on `--select-split`, or by default on `--select-images` train images held out of training and
calibration (lists in runs/qat/<name>/splits/); qat_best.pt is the best of the PTQ model and every
QAT evaluation on that split, and the report shows its numbers on val.

Run directory runs/qat/<name>/: opt.yaml, calibration.md/json, weights/qat_best.pt (by mAP50-95)
and weights/qat_last.pt (every epoch and every --save-period iterations; --resume continues from
it; Ctrl-C writes it), report.md/json: FP32 vs PTQ vs QAT with deltas. `--epochs 0` stops after
calibration and saves the post-training-quantized model as qat_best.pt.
"""
import argparse
import inspect
import itertools
import json
import math
import os
import random
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from qat.compat import UserError, attempt_load, init_seeds, load_checkpoint
from qat.finetune import LOSSES, OPTIMIZERS, RECIPES, SCHEDULES
from qat.settings import CALIB_METHODS, WEIGHT_BITS, QuantSettings
from utils.cli import float_range, imgsz_int, nonneg_float, nonneg_int, positive_float, positive_int
from utils.general import LOGGER, check_dataset, check_img_size, colorstr, increment_path, yaml_load, yaml_save

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = str(ROOT / "weights/demo-gelan.pt")
DEFAULT_DATA = str(ROOT / "data/demo.yaml")
DEFAULT_HYP = str(ROOT / "data/hyps/hyp.qat.yaml")
LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))
METRICS = ("map", "map50", "mp", "mr")


# --------------------------------------------------------------------------------------------------
# Options (train_qat.py's CLI; train.py --qat takes the defaults for what its own CLI lacks)

def add_common_args(p):
    p.add_argument("--weights", type=str, default=DEFAULT_WEIGHTS, help="FP32 checkpoint to quantize")
    p.add_argument("--data", type=str, default=DEFAULT_DATA, help="dataset.yaml path")
    p.add_argument("--hyp", type=str, default=DEFAULT_HYP, help="loss gains (--loss det/both) and augmentation")
    p.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=None,
                   help="image size (default: the checkpoint's training size, else 640)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="total batch size for all ranks")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--workers", type=nonneg_int, default=8, help="max dataloader workers (per rank)")
    p.add_argument("--project", default=str(ROOT / "runs/qat"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--seed", type=nonneg_int, default=0, help="global seed")
    p.add_argument("--trusted", action="store_true", help="full pickle loading of --weights (files you trust)")
    p.add_argument("--val-batches", type=nonneg_int, default=0,
                   help="evaluate on the first N val batches only (0: all)")
    # quantization
    p.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=8,
                   help="8, or 7 for CPUs without VNNI (DESIGN.md section 5)")
    p.add_argument("--calib-method", default="auto", choices=("auto",) + tuple(CALIB_METHODS),
                   help=f"activation calibration: {' | '.join(CALIB_METHODS)}; auto: the best PTQ mAP50-95 on the "
                        f"selection split among max, percentile 99.9/99.99/99.999, mse, entropy")
    p.add_argument("--percentile", type=float_range(0.0, 100.0, lo_open=True), default=99.99,
                   help="percentile for --calib-method percentile")
    p.add_argument("--select-split", default="", metavar="PATH",
                   help="images (folder or .txt list, YOLO labels beside) to choose calibration and the QAT "
                        "model on; default: --select-images train images held out of training")
    p.add_argument("--select-images", type=positive_int, default=200,
                   help="train images held out as the selection split when no --select-split is given")
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
    return FinetuneOptions(epochs=opt.epochs, iters_per_epoch=opt.iters_per_epoch, recipe=opt.recipe, lr=opt.lr,
                           lrf=opt.lrf, optimizer=opt.optimizer, schedule=opt.schedule, warmup=opt.warmup,
                           momentum=opt.momentum, weight_decay=opt.weight_decay, loss=opt.loss,
                           det_weight=opt.det_weight, supervision_stride=opt.supervision_stride,
                           temperature=opt.temperature, eval_period=opt.eval_period,
                           save_dir=Path(save_dir) / "weights", save_period=opt.save_period,
                           settings=settings).validate()


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


# --------------------------------------------------------------------------------------------------
# Pieces

def _main_rank():
    return RANK in (-1, 0)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(obj):
    """rank 0's value on every rank (identity without DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]
    return obj


def load_data(data):
    """check_dataset; the default demo data is generated the first time it is needed."""
    if isinstance(data, dict):
        return data
    try:
        return check_dataset(data)
    except UserError:
        if Path(data).resolve() != Path(DEFAULT_DATA).resolve():
            raise
    if _main_rank():
        from utils.demo_data import main as demo_data
        LOGGER.info(f"{colorstr('data: ')}generating the demo dataset (python -m utils.demo_data --out datasets/demo)")
        if demo_data(["--out", str(ROOT / "datasets/demo"), "--data", DEFAULT_DATA]):
            raise UserError("could not generate the demo data: run python -m utils.demo_data --out datasets/demo")
    _barrier()
    return check_dataset(data)


def check_demo_weights(weights):
    """The default checkpoint is made by training, never downloaded: say so before anything runs."""
    if weights and not Path(weights).exists() and Path(weights).resolve() == Path(DEFAULT_WEIGHTS).resolve():
        raise UserError(f"the demo checkpoint {weights} is not there: train it first (python train.py --cfg "
                        f"models/detect/gelan-t.yaml --data data/demo.yaml ...) or pass --weights")


def load_fp32(weights, device, trusted=False):
    """-> (fused FP32 model in eval mode, checkpoint's training opt dict)."""
    weights = str(weights)
    check_demo_weights(weights)
    ckpt = load_checkpoint(weights, trusted=trusted)
    from qat.checkpoint import is_qat_checkpoint
    if is_qat_checkpoint(ckpt):
        LOGGER.warning(f"WARNING: {weights} is a QAT checkpoint: starting again from its FP32 weights "
                       f"(use --resume to continue that run)")
    ckpt_opt = ckpt.get("opt") if isinstance(ckpt.get("opt"), dict) else {}
    del ckpt
    model = attempt_load(weights, device=device, fuse=True, trusted=trusted)
    return model.float().eval(), ckpt_opt


def model_nc(model):
    return int(getattr(model.model[-1], "nc", getattr(model, "nc", 0)))


def check_nc(model, data, weights, data_name="the data"):
    nc, ncm = int(data["nc"]), model_nc(model)
    if ncm != nc:
        raise UserError(f"{weights} predicts {ncm} classes but {data_name} has {nc}: "
                        f"pass the --data the weights were trained on")


def load_hyp(hyp, required=()):
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
        raise UserError(f"{where} misses {', '.join(missing)}: start from {DEFAULT_HYP}")
    for k, v in hyp.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: {k}={v!r} is not a finite number")
    return hyp


class FirstBatches:
    """The first n batches of a DataLoader (n=0: all), with len() for progress bars."""

    def __init__(self, loader, n=0):
        self.loader, self.n = loader, n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n) if self.n else iter(self.loader)

    def __len__(self):
        return min(len(self.loader), self.n) if self.n else len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def make_loaders(data, imgsz, stride, opt, hyp, rank=-1):
    """-> (train loader (this rank's shard), calibration loader (the same one unless --augment:
    calibration sees plain images), val loader or None (rank 0)). Arguments after `stride` by
    keyword only, and only those upstream's create_dataloader has too (plus `nc` where it exists)."""
    from utils.dataloaders import create_dataloader
    bs = opt.batch_size // max(WORLD_SIZE, 1)
    augment = bool(getattr(opt, "augment", False))
    nc = int(data["nc"])
    # our scan skips and counts labels of a class >= nc; an upstream clone's does not know nc
    scan_checks_nc = "nc" in inspect.signature(create_dataloader).parameters

    def loader(split, batch_size, **kw):
        loader, dataset = create_dataloader(data[split], imgsz, batch_size, stride, hyp=hyp,
                                            **kw, **({"nc": nc} if scan_checks_nc else {}))
        if not scan_checks_nc:
            check_label_classes(dataset, nc, split)
        return loader

    def train_split(aug, prefix):
        # --seed: calibration sample, data order (upstream's create_dataloader has no seed)
        seed = {"seed": int(getattr(opt, "seed", 0))} if "seed" in inspect.signature(create_dataloader).parameters \
            else {}
        return loader("train", bs, augment=aug, rect=False, rank=rank, workers=opt.workers, shuffle=True,
                      prefix=colorstr(prefix), **seed)

    train = train_split(augment, "train: ")
    calib = train_split(False, "calibration: ") if augment else train
    val = None
    if rank in (-1, 0):
        val = loader("val", bs * 2, augment=False, rect=True, rank=-1, workers=opt.workers * 2, pad=0.5,
                     prefix=colorstr("val: "))
    return train, calib, val


def check_label_classes(dataset, nc, split):
    """Upstream clones: refuse a split with a label of class >= nc (their scan does not check it)."""
    for file, labels in zip(dataset.label_files, dataset.labels):
        if len(labels) and labels[:, 0].max() >= nc:
            raise UserError(f"{file}: class {labels[:, 0].max():g} but the data has nc={nc} ({split} split): "
                            f"fix the label or the data yaml's names")


def make_val_fn(data, val_loader, imgsz, batch_size, n_batches=0):
    """model -> {'mp', 'mr', 'map50', 'map'} through val.run (upstream's signature)."""
    import val as validate
    loader = FirstBatches(val_loader, n_batches)

    def val_fn(model):
        results, _, _ = validate.run(data, batch_size=batch_size, imgsz=imgsz, model=model, dataloader=loader,
                                     half=False, plots=False, save_dir=Path(""), compute_loss=None)
        model.float()
        return dict(zip(("mp", "mr", "map50", "map"), (float(x) for x in results[:4])))

    return val_fn


def selection_split(data, opt, save_dir):
    """-> (train source for training and calibration, selection source). With --select-split the
    train set stays whole; otherwise --select-images train images (at most half of them, chosen
    with --seed) are held out: splits/train.txt and splits/select.txt in the run folder (kept on
    --resume so the split never changes within a run)."""
    from utils.dataloaders import list_image_files
    if opt.select_split:
        select = Path(opt.select_split)
        if not select.exists() and isinstance(data.get(opt.select_split), (str, list)):
            return data["train"], data[opt.select_split]  # a key of the data yaml, e.g. 'test'
        list_image_files(str(select), "--select-split ")  # one-line error when there are no images
        return data["train"], str(select)
    split_dir = Path(save_dir) / "splits"
    train_txt, select_txt = split_dir / "train.txt", split_dir / "select.txt"
    if not (train_txt.is_file() and select_txt.is_file()):
        files = list_image_files(data["train"], "train: ")
        n = min(int(opt.select_images), len(files) // 2)
        if n < 1:
            raise UserError(f"train has {len(files)} image(s): too few to hold out a selection split; "
                            f"pass --select-split")
        held = set(random.Random(opt.seed).sample(range(len(files)), n))
        if _main_rank():
            split_dir.mkdir(parents=True, exist_ok=True)
            train_txt.write_text("\n".join(f for i, f in enumerate(files) if i not in held) + "\n")
            select_txt.write_text("\n".join(files[i] for i in sorted(held)) + "\n")
    _barrier()  # every rank, whether or not it saw the lists already
    return str(train_txt), str(select_txt)


def make_select_loader(select, imgsz, stride, opt, hyp):
    from utils.dataloaders import create_dataloader
    bs = 2 * opt.batch_size // max(WORLD_SIZE, 1)
    return create_dataloader(select, imgsz, bs, stride, hyp=hyp, augment=False, rect=True, rank=-1,
                             workers=opt.workers * 2, pad=0.5, prefix=colorstr("select: "))[0]


def choose_calibration(qmodel, settings, select_fn, save_dir):
    """--calib-method auto: evaluate every candidate rule's amax (from the kept histograms) on the
    selection split, load the best (the first of equals, cheapest first) -> settings naming it.
    Rank 0 evaluates; every rank loads the same candidate (their histograms are merged)."""
    from qat.calibrate import auto_candidates, candidate_amaxes, free_histograms, load_amaxes
    candidates = auto_candidates()
    amaxes = candidate_amaxes(qmodel, candidates)
    table = None
    if _main_rank():
        table = []
        for label, method, pct in candidates:
            load_amaxes(qmodel, amaxes[label])
            LOGGER.info(f"{colorstr('calibrate: ')}candidate {label}")
            table.append({"candidate": label, "method": method, "percentile": pct, **select_fn(qmodel)})
    table = _broadcast(table)
    best = max(table, key=lambda r: r["map"])  # max() keeps the first of equal values
    load_amaxes(qmodel, amaxes[best["candidate"]])
    free_histograms(qmodel)
    chosen = QuantSettings.from_dict({**settings.to_dict(), "calib_method": best["method"],
                                      "percentile": best["percentile"] or settings.percentile})
    qmodel.qat["settings"] = chosen.to_dict()
    if _main_rank():
        write_calibration_selection(table, best, save_dir)
    return chosen, table


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


def quantize_and_calibrate(fp32, settings, loader, n_batches, device, save_dir=None, select_fn=None):
    """A quantized, calibrated copy of `fp32` -> (model, settings). --calib-method auto needs
    `select_fn` (rank 0) and returns the settings of the rule it chose; calibration tables in save_dir."""
    from qat.calibrate import calibrate, write_summary
    from qat.quantize import quantize_model, quantizer_summary
    qmodel = quantize_model(deepcopy(fp32), settings)
    n_groups = len(qmodel.qat["groups"])
    LOGGER.info(f"{colorstr('quantize: ')}{settings}; {n_groups} groups of quantization points share one quantizer")
    per_rank = math.ceil(n_batches / max(WORLD_SIZE, 1))
    summary = calibrate(qmodel, FirstBatches(loader, per_rank), settings, device, show=_main_rank())
    if settings.calib_method == "auto":
        settings, _ = choose_calibration(qmodel, settings, select_fn, save_dir)
        summary = quantizer_summary(qmodel)
    if save_dir is not None and _main_rank():
        f = write_summary(summary, save_dir)
        LOGGER.info(f"{colorstr('calibrate: ')}{min(per_rank, len(loader))} batches x {max(WORLD_SIZE, 1)} rank(s), "
                    f"{settings.calib_method}; amax table {f}")
    return qmodel, settings


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


def _latest_last(project):
    runs = sorted(Path(project).glob("*/weights/qat_last.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"--resume: no */weights/qat_last.pt under {project}; pass the qat_last.pt to resume")
    return runs[-1]


def _plain_opt(opt):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items() if k != "results"}


# --------------------------------------------------------------------------------------------------
# The run

def run(opt, model=None, data_dict=None, device=None, write_opt=True):
    """Run the QAT pipeline with `opt` (train_qat.py's options). `model`: an FP32 model to start
    from instead of --weights (train.py --qat); `data_dict`: an already checked data dict.
    Returns {'save_dir', 'rows', 'history', 'best', 'last', 'settings', 'model'}."""
    from qat.checkpoint import load_qat, save_qat
    from qat.finetune import finetune
    from utils.torch_utils import select_device

    main = _main_rank()
    resume = None
    if opt.resume:
        last = Path(_latest_last(opt.project) if opt.resume is True else opt.resume)
        if not last.is_file():
            raise UserError(f"--resume {opt.resume}: file not found; pass a run's weights/qat_last.pt")
        resume = last
        from qat.checkpoint import is_qat_checkpoint, validate_qat_entry
        ckpt = load_checkpoint(last, trusted=opt.trusted)
        if not is_qat_checkpoint(ckpt):
            raise UserError(f"--resume {last}: not a QAT checkpoint (no 'qat' entry): pass a train_qat.py run's "
                            f"weights/qat_last.pt (a train.py run continues with train.py --resume)")
        validate_qat_entry(ckpt, last)
        saved = ckpt.get("opt")
        del ckpt
        if not isinstance(saved, dict):
            raise UserError(f"--resume {last}: the checkpoint holds no 'opt' to continue with")
        keep = {k: getattr(opt, k) for k in ("device", "workers", "trusted")}
        opt = argparse.Namespace(**{**vars(default_opt()), **saved, **keep, "resume": str(last),
                                    "save_dir": str(last.parent.parent)})
    settings = check_opt(opt)
    if model is None:
        check_demo_weights(str(opt.weights))
    device = device or select_device(opt.device, batch_size=opt.batch_size)
    init_seeds(opt.seed + 1 + RANK)

    if getattr(opt, "save_dir", None):
        save_dir = Path(opt.save_dir)
    else:
        fresh = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)) if main else None
        save_dir = Path(_broadcast(fresh))  # one run folder for all ranks, chosen by rank 0
    opt.save_dir = str(save_dir)
    wdir = save_dir / "weights"

    data = data_dict or load_data(opt.data)
    if model is None:
        fp32, ckpt_opt = load_fp32(opt.weights, device, opt.trusted)
    else:
        fp32, ckpt_opt = deepcopy(model).float().to(device), {}
        if hasattr(fp32, "fuse"):
            with torch.no_grad():  # upstream's fuse_conv_and_bn copy_()s into new weights: no graph to them
                fp32.fuse()
        fp32.eval()
    check_nc(fp32, data, opt.weights or "the model", opt.data if isinstance(opt.data, str) else "the data")
    stride = max(int(max(fp32.stride)), 32)
    imgsz = check_img_size(int(opt.imgsz or ckpt_opt.get("imgsz") or 640), stride)
    opt.imgsz = imgsz
    hyp = load_hyp(opt.hyp, required=("box", "cls", "dfl") if getattr(opt, "loss", "distill") != "distill" else ())
    fp32.hyp = hyp
    train_src, select_src = selection_split(data, opt, save_dir)
    train_loader, calib_loader, val_loader = make_loaders(dict(data, train=train_src), imgsz, stride, opt, hyp,
                                                          rank=LOCAL_RANK)
    if main:  # only now: a run that fails on its inputs leaves no run folder behind
        wdir.mkdir(parents=True, exist_ok=True)
        if write_opt:
            yaml_save(save_dir / "opt.yaml", _plain_opt(opt))
    val_fn = make_val_fn(data, val_loader, imgsz, opt.batch_size * 2, opt.val_batches) if main else None
    select_fn = make_val_fn(data, make_select_loader(select_src, imgsz, stride, opt, hyp), imgsz,
                            opt.batch_size * 2) if main else None

    def evaluate(m, label, fn=None):
        LOGGER.info(f"{colorstr('evaluate: ')}{label}")
        return (fn or val_fn)(m)

    rows, select_rows, history, fopts = {}, {}, [], finetune_options(opt, save_dir, settings)
    if resume is not None:
        qmodel, settings, ckpt = load_qat(resume, device, trusted=opt.trusted)
        fopts.settings = settings
        rows = {k: v for k, v in (ckpt.get("rows") or {}).items() if k != "QAT"}
        select_rows = dict(ckpt.get("select_rows") or {})
        fopts.resume = {k: ckpt.get(k) for k in ("epoch", "iteration", "optimizer", "best_fitness", "history")}
        if int(ckpt.get("epoch", 0)) >= opt.epochs and not ckpt.get("iteration"):
            raise UserError(f"--resume {resume}: that run already finished its {opt.epochs} epochs")
        LOGGER.info(f"{colorstr('resume: ')}{resume} at epoch {ckpt.get('epoch')}, iteration {ckpt.get('iteration')}")
        del ckpt
    else:
        if main and not opt.no_eval_origin:
            rows["FP32"] = evaluate(fp32, "FP32")
        qmodel, settings = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device, save_dir,
                                                  select_fn)
        fopts.settings = settings
        if opt.auto_skip is not None:
            settings = _auto_skip(opt, fp32, qmodel, settings, select_fn, save_dir)
            fopts.settings = settings
            if settings.skip_layers != list(opt.skip_layers):
                qmodel, settings = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device,
                                                          save_dir, select_fn)
                fopts.settings = settings
            opt.skip_layers = settings.skip_layers
        if main and not opt.no_eval_ptq:
            rows["PTQ"] = evaluate(qmodel, "PTQ (calibrated, before QAT)")
        if main and opt.epochs > 0:
            select_rows["PTQ"] = evaluate(qmodel, "PTQ on the selection split", select_fn)

    fopts.extra = {"opt": _plain_opt(opt), "rows": rows, "select_rows": select_rows}
    if opt.epochs == 0:
        if main:
            extra = dict(fopts.extra, epoch=0, iteration=0, best_fitness=rows.get("PTQ", {}).get("map", 0.0))
            save_qat(wdir / "qat_best.pt", qmodel, settings, extra)
            save_qat(wdir / "qat_last.pt", qmodel, settings, extra)
    else:
        if main and fopts.resume is None:
            # qat_best.pt starts as the calibrated model: a QAT evaluation replaces it only with a higher
            # mAP50-95 on the selection split, so fine-tuning never hands back something worse there
            fopts.start_fitness = select_rows["PTQ"]["map"]
            save_qat(wdir / "qat_best.pt", qmodel, settings,
                     dict(fopts.extra, epoch=0, iteration=0, best_fitness=fopts.start_fitness, history=[]))
        history = finetune(qmodel, fp32, train_loader, select_fn, fopts)
        if main:
            rows["QAT"], select_rows["QAT"] = _chosen_rows(wdir / "qat_best.pt", rows, select_rows, history,
                                                           device, evaluate, opt.trusted)
    if main:
        (save_dir / "history.json").write_text(json.dumps(history, indent=1))
        if rows:
            write_report(rows, save_dir, note=best_note(wdir / "qat_best.pt") + _selection_note(select_rows))
        LOGGER.info(f"{colorstr('QAT: ')}results in {save_dir}; weights {wdir / 'qat_best.pt'}")
    _barrier()
    return {"save_dir": save_dir, "rows": rows, "select_rows": select_rows, "history": history,
            "best": wdir / "qat_best.pt", "last": wdir / "qat_last.pt", "settings": settings, "model": qmodel}


def _chosen_rows(best_path, rows, select_rows, history, device, evaluate, trusted):
    """qat_best.pt's numbers on val (the reported split) and on the selection split it was chosen by."""
    from qat.checkpoint import load_qat
    ckpt_model, _, ckpt = load_qat(best_path, device, trusted=trusted)
    position = (int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0)))
    chosen = next((h for h in history if (h["epoch"], h["iteration"]) == position and "map" in h), None)
    if chosen is None:  # the PTQ model stayed the best
        val = rows.get("PTQ") or evaluate(ckpt_model, "qat_best.pt (= PTQ) on val")
        sel = select_rows.get("PTQ", {})
    else:
        val = evaluate(ckpt_model, f"qat_best.pt (QAT step {chosen['step']}) on val")
        sel = {k: chosen[k] for k in METRICS}
    step = 0 if chosen is None else chosen["step"]
    return {**{k: val[k] for k in METRICS}, "step": step}, {**{k: sel.get(k) for k in METRICS}, "step": step}


def _selection_note(select_rows):
    if not select_rows:
        return ""
    lines = ["", "", "Selection split (chooses qat_best.pt; never the split above):", "",
             "| model | mAP50-95 | mAP50 |", "|---|---|---|"]
    for name, r in select_rows.items():
        if r.get("map") is not None:
            lines.append(f"| {name} | {r['map']:.4f} | {r['map50']:.4f} |")
    return "\n".join(lines)


def _auto_skip(opt, fp32, qmodel, settings, select_fn, save_dir):
    """Rank 0 ranks layers on the selection split and picks the float set; every rank gets the new settings."""
    from qat.sensitivity import auto_skip, layer_sensitivity, skip_regex, write_sensitivity
    skip = None
    if _main_rank():
        fp32_map = select_fn(fp32)["map"]
        base, ranked = layer_sensitivity(qmodel, select_fn)
        layers, reached, _ = auto_skip(qmodel, ranked, select_fn, fp32_map, opt.auto_skip, base_map=base)
        skip = {"budget": opt.auto_skip, "layers": layers, "map": reached}
        write_sensitivity(save_dir, fp32_map, base, ranked, skip)
        LOGGER.info(f"{colorstr('auto-skip: ')}layers {layers} stay float -> mAP50-95 {reached:.4f} on the selection "
                    f"split (FP32 {fp32_map:.4f}, budget {opt.auto_skip})")
    skip = _broadcast(skip)
    extra = [skip_regex(i) for i in skip["layers"] if skip_regex(i) not in settings.skip_layers]
    return QuantSettings.from_dict({**settings.to_dict(), "skip_layers": settings.skip_layers + extra})


def run_sensitivity(opt):
    """`train_qat.py sensitive`: rank layers by the mAP50-95 they recover when kept float
    (sensitivity.md/json in runs/qat/<name>/), and with --auto-skip the float set for a budget."""
    from qat.sensitivity import auto_skip, layer_sensitivity, write_sensitivity
    from utils.torch_utils import select_device

    if WORLD_SIZE > 1:
        raise UserError("train_qat.py sensitive runs in one process: start it without torchrun")
    settings = check_opt(opt)
    device = select_device(opt.device, batch_size=opt.batch_size)
    init_seeds(opt.seed)
    check_demo_weights(str(opt.weights))
    data = load_data(opt.data)
    fp32, ckpt_opt = load_fp32(opt.weights, device, opt.trusted)
    check_nc(fp32, data, opt.weights, opt.data)
    stride = max(int(max(fp32.stride)), 32)
    imgsz = check_img_size(int(opt.imgsz or ckpt_opt.get("imgsz") or 640), stride)
    hyp = load_hyp(opt.hyp)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    train_src, select_src = selection_split(data, opt, save_dir)
    _, calib_loader, val_loader = make_loaders(dict(data, train=train_src), imgsz, stride, opt, hyp)
    save_dir.mkdir(parents=True, exist_ok=True)
    val_fn = make_val_fn(data, val_loader, imgsz, opt.batch_size * 2, opt.val_batches)
    select_fn = make_val_fn(data, make_select_loader(select_src, imgsz, stride, opt, hyp), imgsz, opt.batch_size * 2)
    fp32_map = val_fn(fp32)["map"]
    qmodel, _ = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device, save_dir, select_fn)
    base, ranked = layer_sensitivity(qmodel, val_fn)
    skip = None
    if opt.auto_skip is not None:
        layers, reached, _ = auto_skip(qmodel, ranked, val_fn, fp32_map, opt.auto_skip, base_map=base)
        skip = {"budget": opt.auto_skip, "layers": layers, "map": reached}
    f = write_sensitivity(save_dir, fp32_map, base, ranked, skip)
    LOGGER.info("\n" + f.read_text())
    return {"save_dir": save_dir, "fp32_map": fp32_map, "quantized_map": base, "ranked": ranked, "auto_skip": skip}


# --------------------------------------------------------------------------------------------------
# train.py --qat

def run_from_train(model, opt, hyp, data_dict, device):
    """The hook train.py calls with `--qat` once its model is built and loaded (ours and, through
    patches/install.py, upstream's). The QAT options not on train.py's CLI take train_qat.py's
    defaults; --epochs, --imgsz, --batch-size, --workers, --seed, --device and the run folder are
    train.py's, and an epoch is one pass over the training data as in train.py (train_qat.py's
    default is 200 iterations). Returns train()'s results tuple (P, R, mAP50, mAP50-95, 0, 0, 0)
    of the best QAT model (PTQ with --epochs 0)."""
    qopt = default_opt()
    for k in ("data", "imgsz", "batch_size", "epochs", "workers", "seed", "device", "save_dir", "trusted"):
        if hasattr(opt, k):
            setattr(qopt, k, getattr(opt, k))
    qopt.weights = str(getattr(opt, "weights", "") or "")
    qopt.hyp = dict(hyp)
    qopt.iters_per_epoch = 0
    for k in vars(qopt):  # train.py may have been given QAT options too (ours does not define them)
        if k.startswith(("calib_", "weight_bits", "no_last_layer", "skip_layers", "residual_quant", "loss",
                         "iters_per_epoch")) \
                and hasattr(opt, k):
            setattr(qopt, k, getattr(opt, k))
    try:
        result = run(qopt, model=model, data_dict=data_dict, device=device, write_opt=False)
    except UserError as e:  # upstream's main() has no run_cli
        import sys
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    r = result["rows"].get("QAT") or result["rows"].get("PTQ") or {}
    return (r.get("mp", 0.0), r.get("mr", 0.0), r.get("map50", 0.0), r.get("map", 0.0), 0.0, 0.0, 0.0)
