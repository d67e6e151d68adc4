"""The common part of every deployment backend: a runtime wrapped as an nn.Module that val.py and
NMS treat like the PyTorch eval model (`stride`, `names`, `nc`, `(B, 4+nc, anchors)` output).

A static-shape file gets its batch padded (and split) and its images padded at the bottom/right with
grey (letterbox colour) up to the exported size, which leaves box coordinates unchanged.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qat.compat import UserError
from qat.graph import metadata, qdq_counts

PAD_VALUE = 114 / 255  # letterbox grey


def log(msg):
    from utils.general import LOGGER

    LOGGER.info(msg)


def static_dim(dim):
    """A positive int dimension, else None (dynamic)."""
    return dim if isinstance(dim, int) and dim > 0 else None


class Backend(nn.Module):
    """Common part: metadata (stride, names), input fitting, timing. Subclasses implement
    `_infer(x: np.ndarray float32 (B,3,H,W)) -> np.ndarray (B, 4+nc, A)`."""
    name = "backend"

    def __init__(self, path, names=None, strides=None, meta=None):
        super().__init__()
        self.path = Path(path)
        meta = dict(meta or {})
        if meta.get("end2end"):
            raise UserError(f"{self.path.name} has NMS inside the graph (--end2end); validation needs the raw "
                            f"output: export again without --end2end")
        strides = strides or meta.get("strides") or meta.get("stride") or [8, 16, 32]
        if isinstance(strides, (int, float)):  # export.py writes the largest stride only
            strides = [int(strides) // 4, int(strides) // 2, int(strides)]
        self.stride = torch.tensor([float(s) for s in strides])
        names = names if names is not None else meta.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=lambda k: int(k))]
        self.names = list(names or [])
        self.nc = None  # set from the output shape
        self.meta = meta
        self.batch, self.height, self.width = None, None, None  # static dims when the file has them
        self.times = []  # seconds per call of the runtime
        # val.run (ours and upstream's) takes the device from next(model.parameters()): the host
        self.register_parameter("_host", nn.Parameter(torch.zeros(0), requires_grad=False))

    # input fitting -----------------------------------------------------------------------------
    def _fit(self, im):
        """im float (B,3,h,w) -> list of (array to run, number of real images in it)."""
        x = im.detach().float().cpu()
        b, _, h, w = x.shape
        H, W = self.height or h, self.width or w
        if h > H or w > W:
            raise UserError(f"images of {h}x{w} do not fit the {self.path.name} input of {H}x{W}: "
                            f"use --imgsz {max(H, W)} (or export with --dynamic)")
        if (h, w) != (H, W):
            x = torch.nn.functional.pad(x, (0, W - w, 0, H - h), value=PAD_VALUE)
        if not self.batch:
            return [(x.numpy(), b)]
        chunks = []
        for i in range(0, b, self.batch):
            c = x[i:i + self.batch]
            n = c.shape[0]
            if n < self.batch:
                c = torch.cat((c, c.new_zeros((self.batch - n, *c.shape[1:]))))
            chunks.append((np.ascontiguousarray(c.numpy()), n))
        return chunks

    def forward(self, im, augment=False, **kwargs):
        """(B, 4+nc, anchors) on the host; `augment` (upstream val passes it) is not supported."""
        outs = []
        for x, n in self._fit(im):
            t0 = time.perf_counter()
            y = self._infer(x)
            self.times.append(time.perf_counter() - t0)
            outs.append(torch.from_numpy(np.asarray(y, dtype=np.float32)[:n]))
        y = torch.cat(outs)
        if self.nc is None:
            self.nc = y.shape[1] - 4
            if len(self.names) < self.nc:
                self.names += [str(i) for i in range(len(self.names), self.nc)]
        return y

    def latency_ms(self):
        """Median milliseconds per runtime call so far."""
        return float(np.median(self.times) * 1e3) if self.times else float("nan")

    def describe(self):
        return f"{self.name} ({self.path.name})"


def onnx_meta(path):
    try:
        return metadata(path)
    except UserError:
        raise
    except Exception:
        return {}


def require_qdq(path):
    """UserError when an ONNX that should be a QAT export has no Q/DQ nodes."""
    counts = qdq_counts(path)
    if counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 0:
        raise UserError(f"'{path}' has no QuantizeLinear/DequantizeLinear nodes: it is a float ONNX, not a QAT "
                        f"export; export the QAT checkpoint with export_qat.py")
    return counts

