"""QAT fine-tuning of a calibrated model against the frozen FP32 model and/or the YOLOv9 detection
loss, as named recipes; evaluation on the selection split every `eval_period` iterations.

Recipes (`--recipe`; each sets the defaults below, an explicit option overrides them):
- `layers` (default; this project's): MSE between quantized and FP32 outputs of every
  `supervision_stride`-th top-level layer and the head; Adam lr 1e-6, cosine to lr * 0.01, with
  learned activation ranges (LSQ) at lr 3e-2 on log(amax) (every recipe's range_lr). Measured
  2026-11-30 on the demo checkpoint, 7-bit weights + entropy calibration (PTQ 0.4932 vs FP32 0.5105
  on 320 val images, seed 0, 60 iterations at batch 8; 3 seeds in
  benchmarks/results/accuracy-w7-entropy-200.md, 200 iterations): weights only at Adam 1e-5 / 1e-4 won nothing
  back (0.503 -> 0.503 on the selection split); ranges at lr x 1000 / 3000 / 10000 with weights at
  1e-5: 0.5040 / 0.5065 / 0.5062; ranges at 3e-2 with weights at 1e-6: 0.5097 (95 % of the drop;
  the ranges do the work, larger weight steps only add rounding flips). Before: Adam lr 1e-5, fixed
  ranges (demo: PTQ -0.0055, QAT -0.0042 with the fixed metric).
- `blocks` (NVIDIA yolov7_qat, also the seed system): MSE of the top-level block outputs only,
  head excluded; Adam with a plateau schedule 1e-6 -> 1e-5 -> 1e-6 (their {0: 1e-6, 3: 1e-5,
  8: 1e-6} over 10 epochs, here as fractions 0 / 0.3 / 0.8 of all iterations).
- `kd` (YOLOv6 QAT's channel-wise + output distillation, adapted to YOLOv9's head): binary KL of the
  class scores at temperature T, KL of the DFL box distributions (4 sides x reg_max bins) at T,
  and MSE of the neck features (the head's inputs) normalised by the FP32 per-channel RMS; Adam
  lr 1e-6 after a 5 % warm-up, cosine. `--loss both` adds the label loss (det_weight x det).
Adam's step moves every weight by about lr whatever the gradient, so lr, not the loss scale,
decides how many INT8 roundings flip; SGD (momentum, nesterov) is there for loss-scaled steps.

`loss='det'` uses utils.loss_tal.ComputeLoss on the labels only (needs `model.hyp`).
Amax values stay fixed (calibrated), or with `learn_ranges` the activation amaxes train too (LSQ,
qat.learned_ranges, lr x `range_lr_mult`); weights and biases train through the straight-through
estimator with clipping (modelopt, pass_through_bwd=False). Multi-GPU: the student is wrapped in
DDP, rank 0 evaluates and writes checkpoints.

Diagnostics at every evaluation (history rows): `int_changed` / `int_total`, the quantized weights
whose INT8 value differs from the PTQ model's, and `layer_error`, the relative MSE (MSE / mean
square of the FP32 output) of every top-level layer on a fixed batch.

Over 300 lines: three recipes share one loop, one optimizer setup and one checkpointing path;
their losses are small functions here so that a recipe reads in one place.
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
from qat.distributed import current_rank, is_distributed
from qat.modules import quantize_once
from qat.quantize import prepare_for_training

LOSSES = ("distill", "det", "both")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
SCHEDULES = ("cosine", "plateau")


@dataclass(frozen=True)
class Recipe:
    target: str  # what is distilled: 'layers' | 'blocks' | 'kd'
    optimizer: str
    lr: float
    schedule: str
    lrf: float = 0.01  # cosine: final lr = lr * lrf
    warmup: float = 0.0  # fraction of all iterations with a linear warm-up from lr * 0.01
    plateau: tuple = ()  # plateau: ((fraction of iterations, lr multiplier), ...)
    learn_ranges: bool = False  # activation amaxes trained too (LSQ, qat.learned_ranges)
    # their lr (Adam steps on log(amax): relative changes), following the schedule; kept when --lr
    # changes (range_lr_mult = range_lr / lr unless given): a multiplier would scale it with --lr
    range_lr: float = 3e-2


RECIPES = {
    "layers": Recipe("layers", "Adam", 1e-6, "cosine", learn_ranges=True),
    "blocks": Recipe("blocks", "Adam", 1e-5, "plateau", plateau=((0.0, 0.1), (0.3, 1.0), (0.8, 0.1))),
    "kd": Recipe("kd", "Adam", 1e-6, "cosine", warmup=0.05),
}


@dataclass
class FinetuneOptions:
    """None: the recipe's value (`resolved()`)."""
    epochs: int = 10
    iters_per_epoch: int = 200  # 0: one pass over the train loader
    recipe: str = "layers"
    lr: float = None
    lrf: float = None
    optimizer: str = None  # Adam | AdamW | SGD (momentum, nesterov)
    schedule: str = None  # cosine | plateau
    warmup: float = None  # fraction of all iterations
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "distill"
    det_weight: float = 1e-3  # the det loss per image is ~1000x the distillation MSE of a trained model
    supervision_stride: int = 1
    temperature: float = 2.0  # recipe kd: softening of class scores and box distributions
    eval_period: int = 0  # evaluate (selection split) every N iterations; 0: at the end of each epoch
    save_dir: Path = None  # weights/ qat_last.pt and qat_best.pt go here (rank 0)
    save_period: int = 100  # also write qat_last.pt every N iterations (0: only at epoch ends)
    settings: object = None  # QuantSettings, stored in the checkpoints
    extra: dict = field(default_factory=dict)  # stored in the checkpoints (opt, ...)
    resume: dict = None  # {'epoch', 'iteration', 'optimizer', 'best_fitness', 'history'} from qat_last.pt
    start_fitness: float = -1.0  # an evaluation must beat this to replace qat_best.pt (PTQ's selection mAP50-95)
    learn_ranges: bool = None  # activation amax trained (LSQ, qat.learned_ranges); weights keep per-channel max
    range_lr_mult: float = None  # learned ranges: their lr = lr x this (steps on log(amax): relative changes)
    diagnostics: bool = True
    show: bool = True

    def resolved(self):
        """The recipe's defaults filled in for every option left at None."""
        r = RECIPES[self.recipe]
        for k in ("lr", "lrf", "optimizer", "schedule", "warmup", "learn_ranges"):
            if getattr(self, k) is None:
                setattr(self, k, getattr(r, k))
        if self.range_lr_mult is None and self.lr:
            self.range_lr_mult = r.range_lr / self.lr
        return self

    def validate(self):
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe {self.recipe} is unknown: use one of {', '.join(RECIPES)}")
        self.resolved()
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss} is unknown: use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer} is unknown: use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule} is unknown: use one of {', '.join(SCHEDULES)}")
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
        if not (math.isfinite(self.range_lr_mult) and self.range_lr_mult > 0):
            raise UserError(f"--range-lr-mult {self.range_lr_mult} must be a finite number > 0")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup {self.warmup} is a fraction of the iterations in [0, 1)")
        if self.eval_period < 0:
            raise UserError(f"--eval-period {self.eval_period} must be >= 0")
        return self

    @property
    def target(self):
        return RECIPES[self.recipe].target


def weights_finite(params, ranges=()):
    """True when every tensor in `params` is finite, and exp() of every learned range in `ranges`
    (a finite log_amax can overflow to an inf amax): one max |x| over all (NaN propagates), one host sync."""
    tensors = [p.detach() for p in params] + [p.detach().exp() for p in ranges]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, float("inf")))) if tensors else True


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


def block_layers(model):
    """Recipe blocks: the top-level layers with weights, head excluded (NVIDIA yolov7_qat)."""
    return [i for i, m in enumerate(model.model[:-1]) if any(True for _ in m.parameters())]


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


class HeadIO:
    """Forward hook on the detection head keeping its inputs (neck features) and raw outputs."""

    def __init__(self, model):
        self.io = None
        self.handle = model.model[-1].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.io = (_flat(args[0]), _flat(output))

    def pop(self):
        io, self.io = self.io, None
        return io

    def remove(self):
        self.handle.remove()


def kd_loss(student_io, teacher_io, reg_max, temperature=2.0):
    """Recipe kd -> {'cls', 'dfl', 'neck'}: class scores (binary KL of sigmoid(x / T)), DFL box
    distributions (KL of softmax over reg_max bins / T, times T^2) and neck features normalised by
    the teacher's per-channel RMS (MSE)."""
    (s_in, s_out), (t_in, t_out) = student_io, teacher_io
    T = float(temperature)
    cls = dfl = neck = 0.0
    for s, t in zip(s_out, t_out):
        s, t = s.float(), t.float()
        nbox = 4 * reg_max
        sc, tc = s[:, nbox:] / T, t[:, nbox:] / T
        p = torch.sigmoid(tc)
        # binary KL elementwise from log-sigmoids (>= 0; the gradient of BCE with soft targets): the difference of
        # the two BCE means cancels to a negative rounding error when scores are tiny (untrained heads)
        kl = p * (F.logsigmoid(tc) - F.logsigmoid(sc)) + (1 - p) * (F.logsigmoid(-tc) - F.logsigmoid(-sc))
        cls = cls + kl.mean() * T * T
        b, _, h, w = s.shape
        sb = F.log_softmax(s[:, :nbox].reshape(b, 4, reg_max, h, w) / T, 2)
        tb = F.log_softmax(t[:, :nbox].reshape(b, 4, reg_max, h, w) / T, 2)
        dfl = dfl + (tb.exp() * (tb - sb)).sum(2).mean() * T * T
    for s, t in zip(s_in, t_in):
        rms = t.float().pow(2).mean((0, 2, 3), keepdim=True).sqrt() + 1e-6
        neck = neck + F.mse_loss(s.float() / rms, t.float() / rms)
    n_out, n_in = max(len(s_out), 1), max(len(s_in), 1)
    return {"cls": cls / n_out, "dfl": dfl / n_out, "neck": neck / n_in}


def make_optimizer(model, opts):
    """One parameter group for the weights; learned activation ranges (if any) in a second one with
    lr x `range_lr_mult` (its 'lr_mult', applied by Trainer.step) and no weight decay."""
    from qat.learned_ranges import range_parameters
    ranges = range_parameters(model)
    taken = {id(p) for p in ranges}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken], "lr_mult": 1.0}]
    if ranges:
        groups.append({"params": ranges, "lr_mult": opts.range_lr_mult, "weight_decay": 0.0})
        if opts.optimizer != "SGD":  # LSQ-scaled gradients of a distillation loss are ~1e-9: Adam's default
            groups[-1]["eps"] = 1e-20  # eps 1e-8 would freeze them; on log(amax) a scale-free step is the aim
    # fused: one kernel for all tensors (CPU and CUDA), ~3x faster than torch's default per-tensor loop on the CPU
    if opts.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=True,
                               weight_decay=opts.weight_decay, fused=True)
    cls = torch.optim.Adam if opts.optimizer == "Adam" else torch.optim.AdamW
    return cls(groups, lr=opts.lr, betas=(opts.momentum, 0.999), weight_decay=opts.weight_decay, fused=True)


def cosine_lr(opts, step, total):
    """lr -> lr * lrf along half a cosine over all QAT iterations."""
    t = min(step / max(total, 1), 1.0)
    return opts.lr * (opts.lrf + (1 - opts.lrf) * 0.5 * (1 + math.cos(math.pi * t)))


def learning_rate(opts, step, total):
    """The recipe's schedule at iteration `step` of `total`: linear warm-up from lr * 0.01 over the
    first `warmup` fraction, then cosine (lr -> lr * lrf) or plateau (lr x the multiplier of the
    last (fraction, multiplier) point reached)."""
    t = step / max(total, 1)
    if opts.schedule == "plateau":
        mult = 1.0
        for start, m in RECIPES[opts.recipe].plateau or ((0.0, 1.0),):
            if t >= start:
                mult = m
        lr = opts.lr * mult
    else:
        lr = cosine_lr(opts, step, total)
    if opts.warmup and t < opts.warmup:
        lr *= 0.01 + 0.99 * t / opts.warmup
    return lr


def integer_weights(model):
    """{conv name: INT weight tensor (int8)} on the quantized model's current grid."""
    from qat.modules import QuantConv2d
    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            q = getattr(m, "weight_quantizer", None)
            if isinstance(m, QuantConv2d) and q.is_enabled and q.amax is not None:
                bound = 2 ** (q.num_bits - 1) - 1
                amax = q.amax.to(m.weight.dtype).clamp_min(1e-12)
                out[name] = torch.round(m.weight.clamp(-amax, amax) / amax * bound).to(torch.int8).cpu()
    return out


def changed_integers(model, reference):
    """(INT8 weights that differ from `reference` = integer_weights(PTQ model), all of them)."""
    now = integer_weights(model)
    changed = sum(int((now[k] != v).sum()) for k, v in reference.items() if k in now)
    return changed, sum(v.numel() for v in reference.values())


@torch.no_grad()
def layer_errors(model, teacher, imgs):
    """Relative MSE (MSE / mean square of the FP32 output) of every top-level layer's output,
    eval mode, on `imgs`."""
    idx = [i for i in range(len(model.model)) if type(model.model[i]).__name__ != "Silence"]
    hs, ht = LayerOutputs(model, idx), LayerOutputs(teacher, idx)
    was_s, was_t = model.training, teacher.training
    try:
        model.eval()(imgs)
        teacher.eval()(imgs)
        so, to = hs.pop(), ht.pop()
    finally:
        hs.remove()
        ht.remove()
        model.train(was_s)
        teacher.train(was_t)
    out = []
    for i in idx:
        pairs = list(zip(_flat(so[i]), _flat(to[i])))
        num = sum(float(F.mse_loss(a.float(), b.float())) for a, b in pairs)
        den = sum(float(b.float().pow(2).mean()) for _, b in pairs) + 1e-12
        out.append(round(num / den, 8))
    return out


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
    """One QAT run. `step(batch, lr)` is one optimisation step; `finetune()` loops."""

    def __init__(self, model, fp32_model, opts):
        self.opts = opts.validate()
        self.model = prepare_for_training(model)
        if opts.learn_ranges:
            from qat.learned_ranges import enable_learned_ranges
            enable_learned_ranges(model)
        self.device = next(model.parameters()).device
        # on the CPU student and teacher train in channels_last: mkldnn convolutions without reorders cost ~0.6x
        # of the default layout's (measured, qat.speed); the quantizers keep the layout (qat.modules.InputQuantizer);
        # close() undoes it. On CUDA (not measured here) the layout stays the default.
        self.layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        model.to(memory_format=self.layout)
        self.teacher = self.s_hooks = self.t_hooks = None
        if opts.loss in ("distill", "both"):
            self.teacher = fp32_model.to(self.device, memory_format=self.layout).train()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            if opts.target == "kd":
                self.s_hooks, self.t_hooks = HeadIO(model), HeadIO(self.teacher)
            else:
                layers = block_layers(model) if opts.target == "blocks" else \
                    supervised_layers(model, opts.supervision_stride)
                self.s_hooks, self.t_hooks = LayerOutputs(model, layers), LayerOutputs(self.teacher, layers)
        self.compute_loss = None
        if opts.loss in ("det", "both"):
            if not isinstance(getattr(model, "hyp", None), dict):
                raise UserError("--loss det/both needs the loss gains (box, cls, dfl): pass --hyp")
            self.compute_loss = _detection_loss(model)
        self.ddp = None
        if is_distributed():
            dev = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=dev)
        self.optimizer = make_optimizer(model, opts)
        from qat.learned_ranges import range_parameters
        self.params, self.ranges = list(model.parameters()), range_parameters(model)  # for weights_finite

    def _distill(self, items):
        s, t = self.s_hooks.pop(), self.t_hooks.pop()
        if self.opts.target != "kd":
            return distill_loss(s, t)
        parts = kd_loss(s, t, int(getattr(self.model.model[-1], "reg_max", 16)), self.opts.temperature)
        items.update({k: float(v.detach()) for k, v in parts.items()})
        return parts["cls"] + parts["dfl"] + parts["neck"]

    def step(self, batch, lr):
        imgs = batch[0].to(self.device, non_blocking=True).float() / 255
        imgs = imgs.contiguous(memory_format=self.layout)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        net = self.ddp or self.model
        net.train()
        items = {}
        if self.teacher is not None:
            with torch.no_grad():
                self.teacher(imgs)
        with quantize_once():  # a tensor shared by two quantization points is quantized once
            preds = net(imgs)
        loss = 0.0
        if self.teacher is not None:
            d = self._distill(items)
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
        if not weights_finite(self.params, self.ranges):
            raise UserError(f"QAT diverged: the weights are not finite after a step at lr {lr:.3g}: lower --lr")
        items["loss"] = float(loss.detach())
        return items

    def close(self):
        """Remove the hooks; student and teacher back in the default layout (checkpoints, export)."""
        if self.s_hooks is not None:
            self.s_hooks.remove()
            self.t_hooks.remove()
        for m in (self.model, self.teacher):
            if m is not None:
                m.to(memory_format=torch.contiguous_format)


def finetune(model, fp32_model, train_loader, val_fn, opts):
    """QAT-fine-tune `model` (quantized, calibrated) in place. `val_fn(model) -> {'map', ...}` on the
    selection split (never the reported one), or None. Evaluates every `eval_period` iterations
    and at each epoch end; qat_best.pt is replaced only by an evaluation above every earlier one and
    `start_fitness`. Returns the history: one dict per evaluation (position, losses since the last
    one, lr, metrics, diagnostics, seconds)."""
    from qat.checkpoint import save_qat

    trainer = Trainer(model, fp32_model, opts)
    rank = current_rank()
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
    batches = _cycle(train_loader)
    probe, reference = None, None
    if main and opts.diagnostics:
        probe = next(iter(train_loader))[0][:4].to(trainer.device).float() / 255  # fixed batch: layer errors
        reference = integer_weights(model)  # the PTQ integers (or the resumed run's: then relative to that)

    def save(kind, epoch, iteration):
        if not (main and wdir):
            return
        extra = dict(opts.extra, epoch=epoch, iteration=iteration, best_fitness=best, history=history,
                     optimizer=trainer.optimizer.state_dict())
        save_qat(wdir / f"qat_{kind}.pt", model, opts.settings, extra)

    def evaluate(epoch, iteration, sums, n, lr, t0):
        """One history row at position (epoch, iteration); replaces qat_best.pt when it is the best."""
        nonlocal best
        row = {"epoch": epoch + (iteration >= iters), "iteration": iteration % iters,
               "step": epoch * iters + iteration, "lr": lr,
               **{k: v / max(n, 1) for k, v in sums.items()}, "seconds": round(time.time() - t0, 1)}
        if main and val_fn is not None:
            metrics = val_fn(model)
            row.update({k: float(metrics[k]) for k in ("mp", "mr", "map50", "map")})
        if main and reference is not None:
            row["int_changed"], row["int_total"] = changed_integers(model, reference)
            row["layer_error"] = layer_errors(model, fp32_model, probe)
        history.append(row)
        fitness = row.get("map", -row.get("loss", 0.0))
        improved = fitness > best
        best = max(best, fitness)
        save("last", row["epoch"], row["iteration"])
        if improved:
            save("best", row["epoch"], row["iteration"])
        if trainer.ddp is not None:
            dist.barrier()

    epoch, it, lr = start_epoch, start_iter, None
    try:
        for epoch in range(start_epoch, opts.epochs):
            t0 = time.time()
            sums, n = {}, 0
            first = start_iter if epoch == start_epoch else 0
            bar = tqdm(range(first, iters), desc=f"QAT epoch {epoch + 1}/{opts.epochs}",
                       disable=not (main and opts.show), bar_format="{l_bar}{bar:10}{r_bar}")
            for it in bar:
                lr = learning_rate(opts, epoch * iters + it, total)
                try:
                    items = trainer.step(next(batches), lr)
                except UserError as e:  # diverged: stop here, nothing written from this point on
                    raise UserError(f"epoch {epoch + 1}, iteration {it + 1}: {e}; qat_best.pt and qat_last.pt "
                                    f"keep the last good model") from None
                n += 1
                for k, v in items.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({k: f"{v / n:.4g}" for k, v in sums.items()} | {"lr": f"{lr:.2e}"})
                if it + 1 < iters and opts.eval_period and (it + 1) % opts.eval_period == 0:
                    evaluate(epoch, it + 1, sums, n, lr, t0)
                    sums, n, t0 = {}, 0, time.time()
                elif opts.save_period and (it + 1) % opts.save_period == 0 and it + 1 < iters:
                    save("last", epoch, it + 1)
            it = iters
            evaluate(epoch, iters, sums, n, lr, t0)
    except KeyboardInterrupt:
        save("last", epoch, it)  # a killed run resumes from here with --resume
        raise
    finally:
        trainer.close()
    return history
