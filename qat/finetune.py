"""QAT fine-tuning of a calibrated model: self-distillation against the FP32 model and/or the
YOLOv9 detection loss, cosine learning rate, evaluation and checkpoints every epoch.

Self-distillation (default, `loss='distill'`): the frozen FP32 copy and the quantized model see the
same batch; the loss is the mean over supervised layers of the MSE between their outputs (layers
model.model[0], [s], [2s], ... for `supervision_stride` s, and always the head). No labels are
needed, and the quantized model is pulled towards exactly what the FP32 model computes.
`loss='det'` uses utils.loss_tal.ComputeLoss on the labels (needs `model.hyp`); `loss='both'` adds
the two: distill + det_weight * det (det per image; on the demo model det is ~5 and distill ~0.005,
so the default 1e-3 weighs them about equally).

Amax values stay fixed (calibrated); weights and biases train through the straight-through
estimator with clipping (modelopt, pass_through_bwd=False). Multi-GPU: the student is wrapped in
DDP, rank 0 evaluates and writes checkpoints.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from qat.compat import UserError
from qat.quantize import prepare_for_training

LOSSES = ("distill", "det", "both")
OPTIMIZERS = ("SGD", "Adam", "AdamW")


@dataclass
class FinetuneOptions:
    epochs: int = 10
    iters_per_epoch: int = 200  # 0: one pass over the train loader
    lr: float = 1e-5  # start of the cosine schedule; ends at lr * lrf
    lrf: float = 0.01
    optimizer: str = "Adam"  # Adam | AdamW | SGD (momentum, nesterov): Adam's step does not shrink with
    # the loss, and a distillation MSE is tiny (squared INT8 rounding errors), so plain SGD barely moves
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "distill"
    det_weight: float = 1e-3  # the det loss per image is ~1000x the distillation MSE of a trained model
    supervision_stride: int = 1
    save_dir: Path = None  # weights/ qat_last.pt and qat_best.pt go here (rank 0)
    save_period: int = 100  # also write qat_last.pt every N iterations (0: only at epoch ends)
    settings: object = None  # QuantSettings, stored in the checkpoints
    extra: dict = field(default_factory=dict)  # stored in the checkpoints (opt, ...)
    resume: dict = None  # {'epoch', 'iteration', 'optimizer', 'best_fitness', 'history'} from qat_last.pt
    start_fitness: float = -1.0  # an epoch must beat this to replace qat_best.pt (the PTQ model's mAP50-95)
    show: bool = True

    def validate(self):
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss} is unknown: use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer} is unknown: use one of {', '.join(OPTIMIZERS)}")
        if self.epochs < 0 or self.iters_per_epoch < 0:
            raise UserError("--epochs and --iters-per-epoch must be >= 0")
        if self.supervision_stride < 1:
            raise UserError(f"--supervision-stride {self.supervision_stride} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr {self.lr} must be a finite number > 0")
        for flag, value in (("--lrf", self.lrf), ("--det-weight", self.det_weight),
                            ("--weight-decay", self.weight_decay), ("--momentum", self.momentum)):
            if not (math.isfinite(value) and value >= 0):  # NaN/inf here trains a NaN model
                raise UserError(f"{flag} {value} must be a finite number >= 0")
        return self


def weights_finite(model):
    """True when every parameter is finite (one reduction per tensor, one host sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def supervised_layers(model, stride):
    """Indices of model.model layers whose outputs are matched: every `stride`-th and the head,
    leaving out pass-through layers (Silence returns its input)."""
    n = len(model.model)
    idx = sorted(set(range(0, n, stride)) | {n - 1})
    return [i for i in idx if type(model.model[i]).__name__ != "Silence"]


class LayerOutputs:
    """Forward hooks that keep the outputs of chosen layers of one model."""

    def __init__(self, model, indices):
        self.outputs = {}
        self.handles = [model.model[i].register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i):
        def hook(module, args, output):
            self.outputs[i] = output
        return hook

    def pop(self):
        out, self.outputs = self.outputs, {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def distill_loss(student_outputs, teacher_outputs):
    """Mean over layers of the MSE between student and teacher outputs."""
    losses = []
    for i, s in student_outputs.items():
        pairs = list(zip(_flat(s), _flat(teacher_outputs[i])))
        if pairs:
            losses.append(sum(F.mse_loss(a.float(), b.float()) for a, b in pairs) / len(pairs))
    return sum(losses) / max(len(losses), 1)


def make_optimizer(model, opts):
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.optimizer == "SGD":
        return torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, nesterov=True,
                               weight_decay=opts.weight_decay)
    cls = torch.optim.Adam if opts.optimizer == "Adam" else torch.optim.AdamW
    return cls(params, lr=opts.lr, betas=(opts.momentum, 0.999), weight_decay=opts.weight_decay)


def cosine_lr(opts, step, total):
    """lr -> lr * lrf along half a cosine over all QAT iterations (no warm-up: the model is trained)."""
    t = min(step / max(total, 1), 1.0)
    return opts.lr * (opts.lrf + (1 - opts.lrf) * 0.5 * (1 + math.cos(math.pi * t)))


def _cycle(loader):
    """Endless batches; DistributedSampler reshuffles per pass."""
    n = 0
    while True:
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(n)
        yield from loader
        n += 1


def _detection_loss(model):
    """YOLOv9's loss for the model's head. Ours handles DDetect and DualDDetect; in an upstream
    clone (patches/install.py) utils.loss_tal is single-head and loss_tal_dual holds the dual one."""
    if type(model.model[-1]).__name__ == "DualDDetect":
        try:
            from utils.loss_tal_dual import ComputeLoss
            return ComputeLoss(model)
        except ImportError:
            pass
    from utils.loss_tal import ComputeLoss
    return ComputeLoss(model)


class Trainer:
    """One QAT run. `step(batch)` is one optimisation step; `run()` loops epochs."""

    def __init__(self, model, fp32_model, opts):
        self.opts = opts.validate()
        self.model = prepare_for_training(model)
        self.device = next(model.parameters()).device
        self.teacher = None
        if opts.loss in ("distill", "both"):
            self.teacher = fp32_model.to(self.device).train()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            layers = supervised_layers(model, opts.supervision_stride)
            self.s_hooks, self.t_hooks = LayerOutputs(model, layers), LayerOutputs(self.teacher, layers)
        self.compute_loss = None
        if opts.loss in ("det", "both"):
            if not isinstance(getattr(model, "hyp", None), dict):
                raise UserError("--loss det/both needs the loss gains (box, cls, dfl): pass --hyp")
            self.compute_loss = _detection_loss(model)
        self.ddp = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=dev)
        self.optimizer = make_optimizer(model, opts)

    def step(self, batch, lr):
        imgs = batch[0].to(self.device, non_blocking=True).float() / 255
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        net = self.ddp or self.model
        net.train()
        items = {}
        if self.teacher is not None:
            with torch.no_grad():
                self.teacher(imgs)
        preds = net(imgs)
        loss = 0.0
        if self.teacher is not None:
            d = distill_loss(self.s_hooks.pop(), self.t_hooks.pop())
            items["distill"] = float(d.detach())
            loss = loss + d
        if self.compute_loss is not None:
            det, _ = self.compute_loss(preds, batch[1].to(self.device))
            det = det / imgs.shape[0]
            items["det"] = float(det.detach())
            loss = loss + (self.opts.det_weight if self.teacher is not None else 1.0) * det
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k} {v:.4g}" for k, v in items.items())
            raise UserError(f"QAT diverged: the loss is {float(loss.detach())} ({parts})"
                            f" at lr {lr:.3g}: lower --lr{' or --det-weight' if self.compute_loss else ''}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not weights_finite(self.model):
            raise UserError(f"QAT diverged: the weights are not finite after a step at lr {lr:.3g}: lower --lr")
        items["loss"] = float(loss.detach())
        return items

    def close(self):
        if self.teacher is not None:
            self.s_hooks.remove()
            self.t_hooks.remove()


def finetune(model, fp32_model, train_loader, val_fn, opts):
    """QAT-fine-tune `model` (quantized, calibrated) in place. `val_fn(model) -> {'map', ...}` or
    None. Returns the history: one dict per epoch (losses, lr, metrics, seconds)."""
    from qat.checkpoint import save_qat

    trainer = Trainer(model, fp32_model, opts)
    rank = _rank()
    main = rank in (-1, 0)
    iters = opts.iters_per_epoch or len(train_loader)
    total = opts.epochs * iters
    res = opts.resume or {}
    start_epoch, start_iter = int(res.get("epoch", 0)), int(res.get("iteration", 0))
    best = float(res.get("best_fitness", opts.start_fitness))
    history = list(res.get("history", []))
    if res.get("optimizer"):
        trainer.optimizer.load_state_dict(res["optimizer"])
    wdir = Path(opts.save_dir) if opts.save_dir else None

    def save(kind, epoch, iteration):
        if not (main and wdir):
            return
        extra = dict(opts.extra, epoch=epoch, iteration=iteration, best_fitness=best, history=history,
                     optimizer=trainer.optimizer.state_dict())
        save_qat(wdir / f"qat_{kind}.pt", model, opts.settings, extra)

    batches = _cycle(train_loader)
    epoch, it, lr = start_epoch, start_iter, None
    try:
        for epoch in range(start_epoch, opts.epochs):
            t0 = time.time()
            sums, n = {}, 0
            first = start_iter if epoch == start_epoch else 0
            bar = tqdm(range(first, iters), desc=f"QAT epoch {epoch + 1}/{opts.epochs}",
                       disable=not (main and opts.show), bar_format="{l_bar}{bar:10}{r_bar}")
            for it in bar:
                lr = cosine_lr(opts, epoch * iters + it, total)
                try:
                    items = trainer.step(next(batches), lr)
                except UserError as e:  # diverged: stop here, nothing written from this point on
                    raise UserError(f"epoch {epoch + 1}, iteration {it + 1}: {e}; qat_best.pt and qat_last.pt "
                                    f"keep the last good model") from None
                n += 1
                for k, v in items.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({k: f"{v / n:.4g}" for k, v in sums.items()} | {"lr": f"{lr:.2e}"})
                if opts.save_period and (it + 1) % opts.save_period == 0 and it + 1 < iters:
                    save("last", epoch, it + 1)
            it = iters
            row = {"epoch": epoch + 1, "lr": lr, **{k: v / max(n, 1) for k, v in sums.items()},
                   "seconds": round(time.time() - t0, 1)}
            if main and val_fn is not None:
                metrics = val_fn(model)
                row.update({k: float(metrics[k]) for k in ("mp", "mr", "map50", "map")})
            history.append(row)
            fitness = row.get("map", -row.get("loss", 0.0))
            improved = fitness > best
            best = max(best, fitness)
            save("last", epoch + 1, 0)
            if improved:
                save("best", epoch + 1, 0)
            if trainer.ddp is not None:
                dist.barrier()
    except KeyboardInterrupt:
        save("last", epoch, it)  # a killed run resumes from here with --resume
        raise
    finally:
        trainer.close()
    return history
