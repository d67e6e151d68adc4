"""PyTorch helpers shared by training, QAT and validation: devices, seeds, EMA, optimizers, DDP."""
import errno
import json
import math
import os
import random
import tempfile
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from models.common import fuse_conv_and_bn  # noqa: F401  (upstream exposes it here too)
from utils.general import LOGGER, UserError

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def select_device(device="", batch_size=0):
    """'' (CUDA if available, else CPU), 'cpu', '0', '0,1', 'cuda:0' -> torch.device.

    A CUDA request on a machine without CUDA is a UserError, not a silent fallback."""
    spec = str(device).strip().lower().replace("cuda:", "").replace(" ", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "":
        return torch.device(f"cuda:{max(LOCAL_RANK, 0)}" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for CUDA but no CUDA GPU is available here: use --device cpu")
    ids = [int(x) for x in spec.split(",") if x.isdigit()]
    if not ids or any(i >= torch.cuda.device_count() for i in ids):
        raise UserError(f"--device {device} is not valid here: {torch.cuda.device_count()} CUDA device(s) visible")
    if len(ids) > 1 and batch_size and batch_size % len(ids):
        raise UserError(f"--batch-size {batch_size} is not a multiple of the {len(ids)} GPUs in --device {device}")
    return torch.device(f"cuda:{ids[max(LOCAL_RANK, 0)] if LOCAL_RANK >= 0 and LOCAL_RANK < len(ids) else ids[0]}")


def init_seeds(seed=0, deterministic=False):
    if deterministic:  # cuBLAS needs this for deterministic matmuls (read when CUDA first initializes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextmanager
def torch_distributed_zero_first(local_rank):
    """Make every rank wait while rank 0 does something first (e.g. builds a dataset cache)."""
    if local_rank not in (-1, 0) and dist.is_available() and dist.is_initialized():
        dist.barrier()
    yield
    if local_rank == 0 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_parallel(model):
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model):
    """The plain model inside a DP/DDP wrapper."""
    return model.module if is_parallel(model) else model


def copy_attr(a, b, include=(), exclude=()):
    for k, v in b.__dict__.items():
        if (len(include) and k not in include) or k.startswith("_") or k in exclude:
            continue
        setattr(a, k, v)


class ModelEMA:
    """Exponential moving average of a model's state (upstream's ModelEMA: decay ramps up with
    updates as decay * (1 - exp(-updates / tau)))."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v *= d
                v += (1 - d) * msd[k].detach()

    def update_attr(self, model, include=(), exclude=("process_group", "reducer")):
        copy_attr(self.ema, model, include, exclude)


def smart_optimizer(model, name="SGD", lr=0.01, momentum=0.9, decay=1e-5):
    """Upstream's three parameter groups: BN weights (no decay), other weights (decay), biases."""
    g = [], [], []  # bn weights, weights, biases
    bn_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for v in model.modules():
        for p_name, p in v.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if p_name == "bias":
                g[2].append(p)
            elif p_name == "weight" and isinstance(v, bn_types):
                g[0].append(p)
            else:
                g[1].append(p)
    if name == "Adam":
        optimizer = torch.optim.Adam(g[2], lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(g[2], lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "RMSProp":
        optimizer = torch.optim.RMSprop(g[2], lr=lr, momentum=momentum)
    elif name == "SGD":
        optimizer = torch.optim.SGD(g[2], lr=lr, momentum=momentum, nesterov=True)
    else:
        raise UserError(f"--optimizer {name} is not one of SGD, Adam, AdamW, RMSProp")
    optimizer.add_param_group({"params": g[0], "weight_decay": 0.0})
    optimizer.add_param_group({"params": g[1], "weight_decay": decay})
    LOGGER.info(f"optimizer: {type(optimizer).__name__}(lr={lr}) with parameter groups "
                f"{len(g[0])} weight(decay=0.0), {len(g[1])} weight(decay={decay}), {len(g[2])} bias")
    return optimizer


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


def _is_write_failure(e):
    """A full / read-only / failing disk, not a bug in the code writing: torch's zip writer reports
    those as a RuntimeError from its inline_container."""
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    return "inline_container" in str(e) or "file write failed" in str(e)


@contextmanager
def atomic_output(path):
    """Yield a temporary path in `path`'s folder; when the block ends without an exception, fsync it
    and os.replace it onto `path` (mode as a plain open() would give), else delete it. A reader, a
    run killed mid-write or a file rejected by a later check never leaves a half-made `path` or
    replaces the previous good one. Every file the tools write goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            if not _is_write_failure(e):
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
            kept = f"the old {path.name} is unchanged" if path.exists() else "nothing was written"
            raise UserError(f"cannot write {path}: {reason} (disk full or not writable?): free space or choose "
                            f"another --project/--out; {kept}") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_atomic(obj, path):
    """torch.save through atomic_output: never a half-written checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_tables(stem, markdown, data):
    """A result as <stem>.md (the table) and <stem>.json (the data), each through atomic_output."""
    stem = Path(stem)
    with atomic_output(stem.with_name(stem.name + ".md")) as tmp:
        tmp.write_text(markdown)
    with atomic_output(stem.with_name(stem.name + ".json")) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))


def intersect_dicts(da, db, exclude=()):
    """Entries of state dict `da` whose key is in `db` with the same shape (and no `exclude` part)."""
    return {k: v for k, v in da.items() if k in db and all(x not in k for x in exclude) and v.shape == db[k].shape}


def one_cycle(y1=0.0, y2=1.0, steps=100):
    """Cosine ramp from y1 to y2 over `steps` (upstream's --cos-lr schedule)."""
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1


def one_flat_cycle(y1=0.0, y2=1.0, steps=100):
    """y1 for the first half of `steps`, then a cosine ramp to y2 (upstream's --flat-cos-lr)."""
    half = max(steps // 2, 1)
    return lambda x: ((1 - math.cos((x - half) * math.pi / half)) / 2) * (y2 - y1) + y1 if x > half else y1


def linear_lr(lrf, epochs):
    """Linear ramp from 1 to lrf over `epochs` (upstream's default schedule)."""
    return lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs (0 = never stop)."""

    def __init__(self, patience=30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False  # True when the next epoch may be the last

    def __call__(self, epoch, fitness):
        if fitness >= self.best_fitness:  # >= lets the all-zero start of training count as progress
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early: no improvement in the last {self.patience} epochs. Best results "
                        f"at epoch {self.best_epoch}, saved as best.pt. Use --patience 0 to disable early stopping.")
        return stop


def time_sync():
    import time

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()
