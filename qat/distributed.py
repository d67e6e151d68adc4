"""Rank and world size under torchrun, and the few collective steps the QAT run needs; identities
without DDP. One place for them (qat.calibrate, qat.finetune and qat.pipeline use these)."""
import os

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
