"""Train a YOLOv9 / GELAN detection model (FP32), upstream's train.py flow.

    python train.py --data data/demo.yaml --cfg models/detect/gelan-t.yaml --weights '' --imgsz 320 --epochs 30
    python train.py --weights runs/train/exp/weights/last.pt --data ... --epochs 10   # fine-tune
    python train.py --resume                                 # continue the newest runs/train/*/weights/last.pt
    python train.py --resume runs/train/exp3/weights/last.pt
    torchrun --nproc_per_node 2 train.py --data ... --cfg ... --batch-size 32   # DDP (gloo on CPU, nccl on CUDA)

A run writes runs/train/<name>/: hyp.yaml, opt.yaml, results.csv (+ .json, .md, .png) and weights/
last.pt, best.pt (full state: model, ema, optimizer; resumable) and last_striped.pt, best_striped.pt
(EMA weights in FP16 only, for deployment), all written atomically and readable by the safe loader.

Differences from upstream: `warmup_epochs: 0` turns warmup off (upstream still warms up for 100
iterations); --close-mosaic N drops mosaic for every epoch from `epochs - N` on (also after a
resume); --resume keeps this command's --device and --workers and drops results.csv rows of the
epochs it trains again. AMP (torch.amp, fp16 + GradScaler) is used on CUDA only.
On a busy shared CPU, OMP_NUM_THREADS=1 can be much faster than two spinning threads.
"""
import argparse
import json
import os
import sys
import time
import warnings
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim import lr_scheduler
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # torchrun / another working directory

import val as validate  # noqa: E402
from models.experimental import attempt_load, load_checkpoint  # noqa: E402
from models.yolo import Model  # noqa: E402
from qat.distributed import setup_ddp  # noqa: E402  (torchrun: one process group setup for train.py and train_qat.py)
from utils.callbacks import Callbacks  # noqa: E402
from utils.cli import (ArgumentParser, add_device_arg, add_trusted_flag, imgsz_int, newest_file,  # noqa: E402
                       nonneg_int, positive_int)
from utils.dataloaders import create_dataloader  # noqa: E402
from utils.general import (LOGGER, UserError, check_dataset, check_img_size, colorstr, increment_path,  # noqa: E402
                           print_args, run_cli, yaml_load, yaml_save)
from utils.loss_tal import ComputeLoss  # noqa: E402
from utils.metrics import fitness  # noqa: E402
from utils.plots import plot_results, read_results_csv  # noqa: E402
from utils.torch_utils import (EarlyStopping, ModelEMA, atomic_output, de_parallel, init_seeds, intersect_dicts,  # noqa: E402
                               linear_lr, one_cycle, one_flat_cycle, save_atomic, smart_optimizer,
                               torch_distributed_zero_first)

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))  # set by torchrun
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"
HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "box",
            "cls", "dfl", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
            "flipud", "fliplr", "mosaic", "mixup")
RESULT_KEYS = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision", "metrics/recall",
               "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/cls_loss", "val/dfl_loss",
               "x/lr0", "x/lr1", "x/lr2")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
NBS = 64  # nominal batch size: gradients are accumulated up to it, weight decay is scaled to it


# --- pieces ------------------------------------------------------------------------------------------

def load_hyp(hyp):
    """Hyperparameters from a yaml path or a dict -> dict: qat.options.load_hyp's reading and checks
    (every training key present, every value a finite number), plus training's own ranges."""
    from qat.options import load_hyp as read_hyp

    hyp = read_hyp(hyp, required=HYP_KEYS, start_from="data/hyps/hyp.scratch-high.yaml")
    if not hyp["lr0"] > 0 or hyp["lrf"] < 0:
        raise UserError(f"hyperparameters lr0={hyp['lr0']} must be > 0 and lrf={hyp['lrf']} >= 0")
    nbs = hyp.get("nbs", NBS)
    if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs < 1:
        raise UserError(f"hyperparameter nbs={nbs!r} must be a positive integer (nominal batch size, default {NBS})")
    return hyp


def build_model(opt, nc, names, device):
    """The model to train -> (model, checkpoint dict or None).

    --weights: a checkpoint (safe loader; --trusted for others) whose 'model' weights are copied into
    a fresh model built from --cfg or, without it, from the checkpoint's own yaml, with nc = data's nc.
    Otherwise a model from --cfg with fresh weights."""
    weights, cfg = str(opt.weights or ""), opt.cfg
    if weights:
        ckpt = load_checkpoint(weights, trusted=opt.trusted)
        src = ckpt["model"] if ckpt.get("model") is not None else ckpt["ema"]
        cfg = cfg or getattr(src, "yaml", None)
        if not cfg:
            raise UserError(f"{weights} holds no model yaml: pass --cfg with the model's yaml")
        model = Model(cfg, ch=3, nc=nc).to(device)
        csd = intersect_dicts(src.float().state_dict(), model.state_dict())
        model.load_state_dict(csd, strict=False)
        LOGGER.info(f"Transferred {len(csd)}/{len(model.state_dict())} items from {weights}")
        if len(csd) < len(model.state_dict()) // 2 and not opt.resume:
            LOGGER.warning(f"WARNING: less than half of the model was transferred from {weights}: does --cfg match "
                           f"it (a fused or reparameterized checkpoint needs its own yaml, e.g. gelan-c.yaml)?")
    else:
        if not cfg:
            raise UserError("pass --cfg (a model yaml, to train from scratch) or --weights (a checkpoint)")
        ckpt = None
        model = Model(cfg, ch=3, nc=nc).to(device)
    model.nc, model.names = nc, list(names)
    return model, ckpt


def build_dataloaders(data_dict, imgsz, batch_size, gs, hyp, opt):
    """-> (train_loader, train_dataset, val_loader or None). Batch sizes are per rank; only rank 0
    (or a single process) validates. Labels of a class >= nc are skipped and counted by the scan."""
    nc = 1 if opt.single_cls else int(data_dict["nc"])
    train_loader, dataset = create_dataloader(data_dict["train"], imgsz, batch_size // WORLD_SIZE, gs, hyp=hyp,
                                              augment=True, rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers,
                                              shuffle=True, prefix=colorstr("train: "), seed=opt.seed,
                                              single_cls=opt.single_cls, nc=nc)
    val_loader = None
    if RANK in (-1, 0):
        val_loader = create_dataloader(data_dict["val"], imgsz, batch_size // WORLD_SIZE * 2, gs, hyp=hyp, rect=True,
                                       rank=-1, workers=opt.workers * 2, pad=0.5, prefix=colorstr("val: "),
                                       single_cls=opt.single_cls, nc=nc)[0]
    return train_loader, dataset, val_loader


def resume_state(ckpt, optimizer, ema, weights, epochs):
    """Restore optimizer, EMA and counters from a last.pt -> (best_fitness, start_epoch)."""
    if ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        raise UserError(f"{weights} holds no training state (a stripped or final checkpoint): resume from the "
                        f"run's weights/last.pt, or start a new training with --weights {weights}")
    start_epoch = int(ckpt["epoch"]) + 1
    if start_epoch >= epochs:
        raise UserError(f"{weights}: training to {epochs} epochs is finished, nothing to resume; start a new "
                        f"training with --weights {weights}")
    optimizer.load_state_dict(ckpt["optimizer"])
    best_fitness = float(ckpt.get("best_fitness") or 0.0)
    if ema is not None and ckpt.get("ema") is not None:
        ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
        ema.updates = int(ckpt["updates"])
    LOGGER.info(f"Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs")
    return best_fitness, start_epoch


def strip_optimizer(f, s):
    """Write `s`: checkpoint `f` with the EMA as the FP16 model and no training state (upstream's
    *_striped.pt). Reads `f` through the safe loader, so every run proves its checkpoints load."""
    x = load_checkpoint(f)
    if x.get("ema") is not None:
        x["model"] = x["ema"]
    for k in ("optimizer", "best_fitness", "ema", "updates"):
        x[k] = None
    x["epoch"] = -1
    x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False
    save_atomic(x, s)
    LOGGER.info(f"Optimizer stripped from {f}, saved as {s}, {os.path.getsize(s) / 1e6:.1f}MB")


def _append_results(file, epoch, values):
    """One upstream-style results.csv row (space-padded columns)."""
    keys = ("epoch",) + RESULT_KEYS
    n = len(keys)
    head = "" if file.exists() else ("%20s," * n % keys).rstrip(",") + "\n"
    with open(file, "a") as f:
        f.write(head + ("%20.5g," * n % (epoch, *values)).rstrip(",") + "\n")


def _truncate_results(file, start_epoch):
    """On resume, drop rows of epochs that will be trained again (the run died after logging them)."""
    if not file.exists():
        return
    lines = file.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",")[0].strip() and
                        float(ln.split(",")[0]) < start_epoch]
    if len(keep) != len(lines):
        with atomic_output(file) as tmp:
            tmp.write_text("".join(keep))


def write_results_tables(save_dir):
    """results.csv -> results.json (list of rows) and results.md (markdown table)."""
    head, rows = read_results_csv(save_dir / "results.csv")
    if not rows:
        return
    recs = [dict(zip(head, r)) for r in rows]
    for r in recs:
        r["epoch"] = int(r["epoch"])
    with atomic_output(save_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(recs, indent=1))
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(f"{v:.5g}" for v in r) + " |" for r in rows]
    with atomic_output(save_dir / "results.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")


# --- training ----------------------------------------------------------------------------------------

@dataclass
class _Loop:
    """What the epochs share and update: the model being trained (DDP-wrapped in DDP), its optimizer,
    LR schedule, EMA and loss, and the counters that warmup and gradient accumulation carry over."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: lr_scheduler.LambdaLR
    lf: object  # epoch -> LR factor: the schedule's lambda, also read by warmup
    ema: object  # ModelEMA on the main rank, None on the others
    scaler: torch.amp.GradScaler
    compute_loss: ComputeLoss
    amp: bool
    nbs: int  # nominal batch size
    accumulate: int  # batches per optimizer step (raised during warmup)
    nb: int  # batches per epoch
    nw: int  # warmup iterations (-1: no warmup)
    last_opt_step: int = -1


def freeze_layers(model, freeze):
    """--freeze N: no gradients for the first N layers; --freeze A B ...: for those layers."""
    if max(freeze) >= len(model.model):
        raise UserError(f"--freeze {' '.join(map(str, freeze))}: the model has layers 0-{len(model.model) - 1} "
                        f"(--freeze N freezes the first N, --freeze A B ... those layers)")
    prefixes = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        if any(x in k for x in prefixes):
            LOGGER.info(f"freezing {k}")
            v.requires_grad = False


def prepare_run(hyp, opt, device):
    """Seeds, dataset, model, frozen layers, image size and run folder -> (data_dict, model, ckpt, gs, imgsz)."""
    save_dir = Path(opt.save_dir)
    init_seeds(opt.seed + 1 + RANK, deterministic=True)
    with torch_distributed_zero_first(LOCAL_RANK):
        data_dict = check_dataset(opt.data)
    nc = 1 if opt.single_cls else int(data_dict["nc"])
    names = ["item"] if opt.single_cls else data_dict["names"]
    model, ckpt = build_model(opt, nc, names, device)
    freeze_layers(model, opt.freeze)
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    if RANK in (-1, 0):  # only now: a run that fails on its inputs leaves no run folder behind
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
        LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
        yaml_save(save_dir / "hyp.yaml", hyp)
        yaml_save(save_dir / "opt.yaml", vars(opt))
    return data_dict, model, ckpt, gs, imgsz


def build_optimizer(model, hyp, opt):
    """-> (optimizer, scheduler, lf, nbs, accumulate). Scales hyp's weight decay to the batch size."""
    batch_size, epochs = opt.batch_size, opt.epochs
    nbs = hyp.get("nbs", NBS)  # optional hyp key (not in upstream's yamls): fewer images per optimizer step
    accumulate = max(round(nbs / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / nbs
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    if opt.cos_lr:
        lf = one_cycle(1, hyp["lrf"], epochs)
    elif opt.flat_cos_lr:
        lf = one_flat_cycle(1, hyp["lrf"], epochs)
    else:
        lf = linear_lr(hyp["lrf"], epochs)
    scheduler = lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    return optimizer, scheduler, lf, nbs, accumulate


def make_loop(model, ckpt, hyp, opt, device, nb):
    """Optimizer, schedule and EMA for `model` (restored from `ckpt` on --resume), SyncBatchNorm and
    DDP wrapping -> (loop, best_fitness, start_epoch). nb: batches per epoch."""
    main_rank, cuda = RANK in (-1, 0), device.type == "cuda"
    optimizer, scheduler, lf, nbs, accumulate = build_optimizer(model, hyp, opt)
    ema = ModelEMA(model) if main_rank else None

    best_fitness, start_epoch = 0.0, 0
    if ckpt is not None and opt.resume:
        best_fitness, start_epoch = resume_state(ckpt, optimizer, ema, opt.weights, opt.epochs)
        if main_rank:
            _truncate_results(Path(opt.save_dir) / "results.csv", start_epoch)

    if opt.sync_bn and cuda and RANK != -1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
        LOGGER.info("Using SyncBatchNorm()")
    model.hyp = hyp  # read by ComputeLoss (box, cls, dfl gains)
    if RANK != -1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if cuda else None,
                                                    output_device=LOCAL_RANK if cuda else None)
    nw = max(round(hyp["warmup_epochs"] * nb), 100) if hyp["warmup_epochs"] > 0 else -1  # warmup iterations
    scheduler.last_epoch = start_epoch - 1
    amp = cuda  # mixed precision only where it pays and is numerically checked: CUDA
    loop = _Loop(model=model, optimizer=optimizer, scheduler=scheduler, lf=lf, ema=ema,
                 scaler=torch.amp.GradScaler("cuda", enabled=amp), compute_loss=ComputeLoss(model), amp=amp,
                 nbs=nbs, accumulate=accumulate, nb=nb, nw=nw)
    return loop, best_fitness, start_epoch


def _warmup(loop, ni, epoch, hyp, batch_size):
    """Warmup step `ni`: bias lr falls from warmup_bias_lr, other lrs rise from 0, momentum rises, and
    gradients accumulate over more batches as the nominal batch size is approached."""
    xi = [0, loop.nw]
    loop.accumulate = max(1, int(np.interp(ni, xi, [1, loop.nbs / batch_size]).round()))
    for j, x in enumerate(loop.optimizer.param_groups):
        x["lr"] = float(np.interp(ni, xi, [hyp["warmup_bias_lr"] if j == 0 else 0.0,
                                           x["initial_lr"] * loop.lf(epoch)]))
        if "momentum" in x:
            x["momentum"] = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))


def _train_batch(loop, imgs, targets, ni, epoch, i, hyp, device):
    """Forward, backward and (every `accumulate` batches) an optimizer + EMA step -> loss items."""
    with torch.autocast(device_type=device.type, enabled=loop.amp):
        pred = loop.model(imgs)
        loss, loss_items = loop.compute_loss(pred, targets.to(device))  # loss scaled by batch size
        if not torch.isfinite(loss).all():
            raise UserError(f"training diverged: the loss is {loss.item()} at epoch {epoch}, batch {i} "
                            f"(lr0={hyp['lr0']}): lower lr0 in --hyp; last.pt/best.pt keep the last good epoch")
        if RANK != -1:
            loss = loss * WORLD_SIZE  # DDP averages gradients over ranks
    loop.scaler.scale(loss).backward()

    if ni - loop.last_opt_step >= loop.accumulate:
        loop.scaler.unscale_(loop.optimizer)
        nn.utils.clip_grad_norm_(loop.model.parameters(), max_norm=10.0)
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.optimizer.zero_grad()
        if loop.ema is not None:
            loop.ema.update(loop.model)
        loop.last_opt_step = ni
    return loss_items


def train_one_epoch(loop, epoch, train_loader, dataset, hyp, opt, device, callbacks):
    """One pass over the training data -> mean (box, cls, dfl) loss, or None when a callback stopped training."""
    epochs, main_rank = opt.epochs, RANK in (-1, 0)
    loop.model.train()
    if opt.close_mosaic and epoch >= epochs - opt.close_mosaic and dataset.mosaic:
        LOGGER.info(f"Closing dataloader mosaic for the last {epochs - epoch} epochs")
        dataset.mosaic = False  # the loader starts fresh workers every epoch, so they see this
    if main_rank:
        callbacks.run("on_train_epoch_start", epoch)
    mloss = torch.zeros(3, device=device)
    if RANK != -1:
        train_loader.sampler.set_epoch(epoch)
    pbar = enumerate(train_loader)
    LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "cls_loss", "dfl_loss", "Instances", "Size"))
    if main_rank:
        pbar = tqdm(pbar, total=loop.nb, bar_format=TQDM_BAR_FORMAT)
    loop.optimizer.zero_grad()
    for i, (imgs, targets, _paths, _) in pbar:
        ni = i + loop.nb * epoch  # batches since the start of training
        imgs = imgs.to(device, non_blocking=True).float() / 255
        if ni <= loop.nw:
            _warmup(loop, ni, epoch, hyp, opt.batch_size)
        loss_items = _train_batch(loop, imgs, targets, ni, epoch, i, hyp, device)
        if main_rank:
            mloss = (mloss * i + loss_items) / (i + 1)
            mem = f"{torch.cuda.memory_reserved(device) / 1e9 if device.type == 'cuda' else 0:.3g}G"
            pbar.set_description(("%11s" * 2 + "%11.4g" * 5) %
                                 (f"{epoch}/{epochs - 1}", mem, *mloss, targets.shape[0], imgs.shape[-1]))
            callbacks.run("on_train_batch_end", epoch, i, loss_items)
            if callbacks.stop_training:
                return None
    return mloss


def _step_schedule(loop):
    """The epoch's learning rates (for results.csv), then the scheduler's step to the next epoch's."""
    lr = [x["lr"] for x in loop.optimizer.param_groups]
    with warnings.catch_warnings():  # AMP may skip every step of a short first epoch: that is fine
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
        loop.scheduler.step()
    return lr


def save_checkpoints(loop, epoch, best_fitness, fi, opt):
    """last.pt (+ best.pt when this epoch is the best, + epoch{N}.pt every --save-period) -> last.pt's path."""
    w = Path(opt.save_dir) / "weights"
    ckpt = {"epoch": epoch,
            "best_fitness": best_fitness,
            "model": deepcopy(de_parallel(loop.model)).half(),
            "ema": deepcopy(loop.ema.ema).half(),
            "updates": loop.ema.updates,
            "optimizer": loop.optimizer.state_dict(),
            "opt": vars(opt),
            "git": None,
            "date": datetime.now().isoformat()}
    save_atomic(ckpt, w / "last.pt")
    if best_fitness == fi:
        save_atomic(ckpt, w / "best.pt")
    if opt.save_period > 0 and epoch % opt.save_period == 0:
        save_atomic(ckpt, w / f"epoch{epoch}.pt")
    return w / "last.pt"


def validate_and_save(loop, epoch, mloss, lr, results, best_fitness, stopper, evaluate, hyp, opt, callbacks):
    """Main rank, end of an epoch: validate the EMA, log results.csv, save checkpoints
    -> (results, best_fitness, stop). Without validation (--noval) the previous results are kept."""
    ema = loop.ema
    ema.update_attr(loop.model, include=["yaml", "nc", "hyp", "names", "stride"])
    if not all(torch.isfinite(p).all() for p in ema.ema.state_dict().values() if p.is_floating_point()):
        raise UserError(f"training diverged: the weights are not finite after epoch {epoch} "
                        f"(lr0={hyp['lr0']}): lower lr0 in --hyp; last.pt/best.pt keep the last good epoch")
    final_epoch = (epoch + 1 == opt.epochs) or stopper.possible_stop
    if not opt.noval or final_epoch:
        results, _maps, _ = evaluate(half=loop.amp, model=ema.ema, plots=False)
    fi = float(fitness(np.array(results, dtype=float).reshape(1, -1))[0])
    stop = stopper(epoch=epoch, fitness=fi)
    best_fitness = max(best_fitness, fi)
    values = [float(x) for x in (*mloss.tolist(), *results, *lr)]
    _append_results(Path(opt.save_dir) / "results.csv", epoch, values)
    callbacks.run("on_fit_epoch_end", epoch, dict(zip(RESULT_KEYS, values)), best_fitness, fi)

    if not opt.nosave or final_epoch:
        last = save_checkpoints(loop, epoch, best_fitness, fi, opt)
        callbacks.run("on_model_save", last, epoch, final_epoch, best_fitness, fi)
    return results, best_fitness, stop


def finish_training(loop, start_epoch, epoch, t0, results, evaluate, device, opt, callbacks):
    """Main rank, after the last epoch (`epoch`): stripped checkpoints, a verbose validation of best.pt,
    result tables and plots -> the final results (of best.pt when there is one)."""
    save_dir = Path(opt.save_dir)
    w = save_dir / "weights"
    last, best = w / "last.pt", w / "best.pt"
    plots = not opt.noplots
    LOGGER.info(f"\n{epoch - start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
    for f in (last, best):
        if f.exists():
            strip_optimizer(f, w / f"{f.stem}_striped.pt")
    if best.exists():
        LOGGER.info(f"\nValidating {best}...")
        model_best = attempt_load(best, device)
        results, _, _ = evaluate(model=model_best.half() if loop.amp else model_best, verbose=True, plots=plots)
    write_results_tables(save_dir)
    if plots:
        plot_results(save_dir / "results.csv")
    callbacks.run("on_train_end", last, best, epoch, results)
    LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}")
    return results


def train(hyp, opt, device, callbacks):
    """Train with the settings in `opt` (see parse_opt) on `device`; returns the final results tuple
    (P, R, mAP50, mAP50-95, val box/cls/dfl loss) of best.pt."""
    save_dir, epochs, batch_size = Path(opt.save_dir), opt.epochs, opt.batch_size
    main_rank = RANK in (-1, 0)
    hyp = load_hyp(hyp)
    opt.hyp = hyp.copy()  # saved in opt.yaml and the checkpoints (before weight decay scaling)
    data_dict, model, ckpt, gs, imgsz = prepare_run(hyp, opt, device)

    # QAT (issues 4-5): `--qat` hands the loaded FP32 model to qat.pipeline (the code train_qat.py
    # runs) and returns its results instead of running the FP32 loop below (DDP is set up by main()).
    if getattr(opt, "qat", False):
        from qat.pipeline import run_from_train
        return run_from_train(model, opt=opt, hyp=hyp, data_dict=data_dict, device=device)

    train_loader, dataset, val_loader = build_dataloaders(data_dict, imgsz, batch_size, gs, hyp, opt)
    loop, best_fitness, start_epoch = make_loop(model, ckpt, hyp, opt, device, nb=len(train_loader))
    del ckpt, model  # the loop holds the model (DDP-wrapped in DDP); the checkpoint is no longer needed
    # the same validation each epoch (EMA) and at the end (best.pt), on rank 0's val loader
    evaluate = partial(validate.run, data_dict, batch_size=batch_size // WORLD_SIZE * 2, imgsz=imgsz,
                       single_cls=opt.single_cls, dataloader=val_loader, save_dir=save_dir,
                       compute_loss=loop.compute_loss)

    t0 = time.time()
    results = (0, 0, 0, 0, 0, 0, 0)  # P, R, mAP50, mAP50-95, val box, cls, dfl
    stopper, stop = EarlyStopping(patience=opt.patience), False
    if main_rank:
        callbacks.run("on_train_start", SimpleNamespace(model=de_parallel(loop.model), optimizer=loop.optimizer,
                                                        ema=loop.ema, start_epoch=start_epoch, epochs=epochs,
                                                        dataset=dataset, best_fitness=best_fitness,
                                                        save_dir=save_dir))
    LOGGER.info(f"Image sizes {imgsz} train, {imgsz} val\n"
                f"Using {train_loader.num_workers * WORLD_SIZE} dataloader workers\n"
                f"Logging results to {colorstr('bold', save_dir)}\n"
                f"Starting training for {epochs} epochs...")
    epoch = start_epoch
    for epoch in range(start_epoch, epochs):
        mloss = train_one_epoch(loop, epoch, train_loader, dataset, hyp, opt, device, callbacks)
        if mloss is None:  # a callback set stop_training
            return results
        lr = _step_schedule(loop)
        if main_rank:
            results, best_fitness, stop = validate_and_save(loop, epoch, mloss, lr, results, best_fitness, stopper,
                                                            evaluate, hyp, opt, callbacks)
        if RANK != -1:  # every rank must stop together
            flag = [stop if RANK == 0 else None]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        if stop:
            break

    if main_rank:
        results = finish_training(loop, start_epoch, epoch, t0, results, evaluate, device, opt, callbacks)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# --- command line ------------------------------------------------------------------------------------

def parse_opt(argv=None):
    parser = ArgumentParser(description="Train a YOLOv9 / GELAN detector (FP32, upstream flow)")
    parser.add_argument("--weights", type=str, default="", help="initial weights path ('' = from scratch)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml path, e.g. models/detect/gelan-t.yaml")
    parser.add_argument("--data", type=str, default=str(ROOT / "data/demo.yaml"), help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default=str(ROOT / "data/hyps/hyp.scratch-high.yaml"),
                        help="hyperparameters path")
    parser.add_argument("--epochs", type=positive_int, default=100, help="total training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="total batch size for all ranks")
    parser.add_argument("--imgsz", "--img", "--img-size", type=imgsz_int, default=640,
                        help="train, val image size (pixels)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="resume the newest run under --project, or the given last.pt")
    parser.add_argument("--qat", action="store_true",
                        help="quantization-aware fine-tuning of --weights instead of training (see train_qat.py)")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    add_device_arg(parser, default="")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=OPTIMIZERS, default="SGD", help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only in DDP mode on CUDA")
    parser.add_argument("--workers", type=nonneg_int, default=8, help="max dataloader workers (per rank in DDP mode)")
    parser.add_argument("--project", default=str(ROOT / "runs/train"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--flat-cos-lr", action="store_true", help="flat cosine LR scheduler")
    parser.add_argument("--patience", type=nonneg_int, default=100,
                        help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=nonneg_int, default=[0],
                        help="Freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="Save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="Global training seed")
    parser.add_argument("--close-mosaic", type=nonneg_int, default=0, help="train the last N epochs without mosaic")
    add_trusted_flag(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _resume_opt(opt):
    """--resume: the opt of the run (opt.yaml beside weights/, else the checkpoint's), continuing in
    its folder from its last.pt. --device and --workers stay those of this command (machine-specific)."""
    last = newest_file(opt.project, "*/weights/last.pt") if opt.resume is True else Path(opt.resume)
    if last is None:
        raise UserError(f"--resume: no */weights/last.pt under {opt.project}; pass the last.pt to resume")
    if not last.is_file():
        raise UserError(f"--resume {opt.resume}: file not found; pass a run's weights/last.pt")
    opt_yaml = last.parent.parent / "opt.yaml"
    d = yaml_load(opt_yaml) if opt_yaml.is_file() else load_checkpoint(last, trusted=opt.trusted).get("opt")
    if not isinstance(d, dict):
        raise UserError(f"--resume {last}: no opt.yaml beside weights/ and no 'opt' in the checkpoint")
    new = vars(parse_opt([]))
    new.update(d)
    new.update(weights=str(last), cfg="", resume=True, save_dir=str(last.parent.parent), device=opt.device,
               workers=opt.workers, trusted=opt.trusted)
    return argparse.Namespace(**new)


def _check_opt(opt):
    if opt.epochs < 1:
        raise UserError(f"--epochs {opt.epochs}: train at least 1 epoch")
    if opt.batch_size < 1:
        raise UserError(f"--batch-size {opt.batch_size} is not supported: pass a positive batch size")
    if opt.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {opt.optimizer} is not one of {', '.join(OPTIMIZERS)}")
    if RANK != -1 and opt.batch_size % WORLD_SIZE:
        raise UserError(f"--batch-size {opt.batch_size} must be a multiple of the {WORLD_SIZE} DDP processes")
    if opt.cos_lr and opt.flat_cos_lr:
        raise UserError("pass at most one of --cos-lr and --flat-cos-lr")


def main(opt, callbacks=None):
    callbacks = callbacks or Callbacks()
    if RANK in (-1, 0):
        print_args(vars(opt))

    device = setup_ddp(opt.device, batch_size=opt.batch_size)  # and the process group under torchrun

    if opt.resume:
        opt = _resume_opt(opt)
    else:
        opt.weights, opt.cfg, opt.hyp = str(opt.weights or ""), str(opt.cfg or ""), opt.hyp
        if RANK in (-1, 0):
            opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
        if RANK != -1:  # one run folder for all ranks, chosen by rank 0
            box = [getattr(opt, "save_dir", None)]
            dist.broadcast_object_list(box, 0)
            opt.save_dir = box[0]
    _check_opt(opt)

    # init_seeds(deterministic=True) switches on a process-wide setting: restore it afterwards
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.benchmark)
    try:
        return opt, train(opt.hyp, opt, device, callbacks)
    finally:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.backends.cudnn.benchmark = det[2]
        if LOCAL_RANK != -1 and dist.is_initialized():
            dist.destroy_process_group()


def run(callbacks=None, **kwargs):
    """Python entry point: `train.run(data='data/demo.yaml', cfg='models/detect/gelan-t.yaml', imgsz=320)`.
    Keyword names are the CLI's long options with '_' for '-'. Returns the opt used (the run's own
    after --resume), with `opt.results` = (P, R, mAP50, mAP50-95, val losses) of best.pt."""
    opt = parse_opt([])
    unknown = [k for k in kwargs if not hasattr(opt, k)]
    if unknown:
        raise UserError(f"train.run: unknown option(s) {', '.join(unknown)}")
    for k, v in kwargs.items():
        setattr(opt, k, v)
    opt, results = main(opt, callbacks)
    opt.results = results
    return opt


if __name__ == "__main__":
    run_cli(lambda: main(parse_opt()))
