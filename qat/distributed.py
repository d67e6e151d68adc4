"""Rank and world size under torchrun, and the few collective steps the QAT run needs; identities
without DDP. One place for them (qat.calibrate, qat.finetune and qat.pipeline use these; train.py and
train_qat.py start their process group with `setup_ddp`)."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
RANK = int(os.getenv("RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def is_distributed():
    """Several processes in an initialized process group: collectives are needed."""
    return is_initialized() and dist.get_world_size() > 1


def current_rank():
    return dist.get_rank() if is_initialized() else -1


def is_main_rank():
    """Rank 0, or no DDP at all: the process that evaluates and writes files."""
    return RANK in (-1, 0)


def barrier():
    if is_initialized():
        dist.barrier()


def broadcast(obj):
    """rank 0's value on every rank (identity without DDP)."""
    if is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]
    return obj


def setup_ddp(device, batch_size=0):
    """--device -> torch.device; under torchrun also this process's CUDA device and the process group
    (NCCL on CUDA, gloo on CPU). The 3 h timeout: rank 0 validates while the other ranks wait."""
    from qat.compat import UserError
    from utils.general import LOGGER
    from utils.torch_utils import select_device

    device = select_device(device, batch_size=batch_size)
    if LOCAL_RANK == -1:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= LOCAL_RANK:
            raise UserError(f"torchrun started {WORLD_SIZE} processes but only {torch.cuda.device_count()} "
                            f"CUDA device(s) are visible")
        torch.cuda.set_device(LOCAL_RANK)
        device = torch.device("cuda", LOCAL_RANK)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=3),
                                device_id=device if device.type == "cuda" else None)
        LOGGER.info(f"DDP: {WORLD_SIZE} processes, backend {dist.get_backend()}, device {device}")
    return device
