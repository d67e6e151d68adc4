"""General helpers shared by every command: logging, user-facing errors, small numeric utilities."""
import errno
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml

from utils.cli import MAX_IMGSZ

LOGGING_NAME = "yolov9-qat"


def _make_logger(name=LOGGING_NAME):
    rank = int(os.getenv("RANK", -1))
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank in (-1, 0) else logging.WARNING)
    logger.propagate = False
    return logger


LOGGER = _make_logger()


class UserError(Exception):
    """A problem with the user's input. CLIs print it as one line (`error: ...`) and exit 2."""


def colorstr(*parts):
    """Wrap a string in ANSI colours, upstream style: colorstr('blue', 'bold', 'hello')."""
    *codes, text = parts if len(parts) > 1 else ("blue", "bold", parts[0])
    table = {"black": "\033[30m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m",
             "blue": "\033[34m", "magenta": "\033[35m", "cyan": "\033[36m", "white": "\033[37m",
             "bold": "\033[1m", "underline": "\033[4m", "end": "\033[0m"}
    return "".join(table[c] for c in codes) + f"{text}" + table["end"]


def make_divisible(x, divisor):
    """Smallest multiple of `divisor` that is >= x."""
    divisor = int(divisor.max()) if hasattr(divisor, "max") else int(divisor)
    return math.ceil(x / divisor) * divisor


# --------------------------------------------------------------------------------------------------
# Command line helpers


_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS, errno.ENOSPC, errno.EEXIST}


def run_cli(main_fn):
    """Run a CLI entry point: a UserError becomes `error: <message>` on stderr and exit status 2,
    Ctrl-C becomes one line and exit status 130. Anything else is a bug and keeps its traceback."""
    try:
        return main_fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an output folder that can't be written: the user's to fix, not a bug
        if e.errno not in _UNWRITABLE:
            raise
        print(f"error: cannot write {e.filename or 'output'}: {e.strerror}; choose another --project/--out "
              f"or fix its permissions or free space", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def print_args(args, prefix=None):
    """Log a dict of arguments on one line, prefixed by the calling file's name (or `prefix`)."""
    if prefix is None:
        prefix = Path(sys._getframe(1).f_code.co_filename).stem
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else dict(args)
    head = colorstr(f"{prefix}: ") if prefix else ""
    LOGGER.info(head + ", ".join(f"{k}={v}" for k, v in args.items()))


def file_size(path):
    """Size of a file, or of everything under a directory, in MB (MiB); 0.0 when it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / (1 << 20)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20)
    return 0.0


def check_img_size(imgsz, s=32, floor=0):
    """Return `imgsz` (int or list) unchanged if every size is a multiple of stride `s` and >= `floor`.

    Upstream silently rounds; we refuse with a message that says which size to use instead."""
    s = int(s.max()) if hasattr(s, "max") else int(s)
    scalar = np.ndim(imgsz) == 0
    sizes = [imgsz] if scalar else list(imgsz)
    for x in sizes:
        if int(x) != x or x <= 0:
            raise UserError(f"--imgsz {x} is not a positive whole number of pixels")
        if x > MAX_IMGSZ:
            raise UserError(f"--imgsz {x} is larger than {MAX_IMGSZ} px: use a smaller size (640 is usual)")
        if x % s:
            raise UserError(f"--imgsz {x} is not a multiple of the model stride {s}: "
                            f"use {max(make_divisible(x, s), make_divisible(floor, s))}")
        if x < floor:
            raise UserError(f"--imgsz {x} is below the minimum {floor}: use {make_divisible(floor, s)}")
    return int(sizes[0]) if scalar else [int(x) for x in sizes]


def increment_path(path, exist_ok=False, sep="", mkdir=False):
    """runs/exp -> runs/exp2, runs/exp3, ... (first free one) unless exist_ok; files keep their suffix."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        n = 2
        while Path(f"{stem}{sep}{n}{suffix}").exists():
            n += 1
        path = Path(f"{stem}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# YAML and datasets


def yaml_load(path):
    """Load a YAML file with yaml.safe_load (never executes tags)."""
    with open(path, errors="ignore") as f:
        return yaml.safe_load(f)


def yaml_load_mapping(path, hint, flag=""):
    """A yaml file that must hold a mapping -> dict. Invalid YAML or another kind of content is a
    UserError: `<flag><path> is not valid YAML: ...` / `... does not hold a mapping: <hint>`."""
    try:
        loaded = yaml_load(path)
    except yaml.YAMLError as e:
        raise UserError(f"{flag}{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{flag}{path} does not hold a mapping: {hint}")
    return loaded


def yaml_save(path, data):
    """Save a dict as YAML (Path values written as strings, key order kept), atomically."""
    from utils.torch_utils import atomic_output  # (utils.torch_utils imports this module)

    with atomic_output(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)


def _names_list(names, where):
    if isinstance(names, dict):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in names):  # mixed keys cannot be sorted
            raise UserError(f"{where}: 'names' keys must be the class indices 0..{len(names) - 1}, "
                            f"got {list(names)[:5]}")
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise UserError(f"{where}: 'names' keys must be the class indices 0..{len(keys) - 1}, "
                            f"got {list(names)[:5]}")
        return [str(names[k]) for k in keys]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    raise UserError(f"{where}: 'names' must be a non-empty list of class names or a dict {{0: name, ...}}")


def _split_exists(root, split):
    splits = split if isinstance(split, (list, tuple)) else [split]
    return all((Path(str(p)).expanduser() if Path(str(p)).is_absolute() else root / str(p)).exists() for p in splits)


COCO_SPLITS = ("train2017", "val2017", "test-dev2017")  # upstream data/coco.yaml image lists


def check_dataset(data, required=("train", "val")):
    """Read and check a data yaml (path or dict) and return it as a dict with absolute paths.

    A relative `path` (the dataset root) is resolved against the current directory when it exists
    there (and holds the train/val splits, if it exists in several places), else against the yaml
    file's folder, else against the repository root; without `path`, the yaml file's folder (the
    current directory for a dict). `train`/`val`/`test`/`select` (QAT's selection split) are made absolute (a folder, a .txt list of
    images, or a list of those); `names` becomes a list and `nc` is checked against it. Splits
    named in `required` must exist, others only warn. Nothing is
    ever downloaded: every problem is a UserError saying what is wrong and how to fix it."""
    yaml_dir = Path.cwd()
    where = "data"
    if isinstance(data, (str, Path)):
        file = Path(data)
        where = str(file)
        if not file.is_file():
            raise UserError(f"data yaml {file} not found: pass --data with the path of a dataset yaml "
                            f"(keys path, train, val, names)")
        data = yaml_load_mapping(file, "a data yaml needs keys path, train, val, names")
        yaml_dir = file.resolve().parent
    elif isinstance(data, dict):
        data = dict(data)
    else:
        raise UserError(f"--data must be a yaml file path or a dict, got {type(data).__name__}")

    for k in ("train", "val", "names"):
        if k not in data or data[k] is None:
            raise UserError(f"{where}: key '{k}' is missing: add '{k}:' to the data yaml "
                            f"({'class names, e.g. names: [person, car]' if k == 'names' else 'images folder or .txt list, relative to path'})")
    data["names"] = _names_list(data["names"], where)
    nc = data.get("nc")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int)):
        raise UserError(f"{where}: nc must be the number of classes, a whole number, got {nc!r}")
    if "nc" in data and data["nc"] is not None and int(data["nc"]) != len(data["names"]):
        raise UserError(f"{where}: nc is {data['nc']} but names lists {len(data['names'])} classes: make them agree")
    data["nc"] = len(data["names"])

    root = Path(str(data.get("path") or ".")).expanduser()
    if not root.is_absolute():
        # ... then the repository root (upstream's ROOT / path), so data/demo.yaml works from any folder
        candidates = [Path.cwd() / root, yaml_dir / root, Path(__file__).resolve().parents[1] / root] \
            if data.get("path") else [yaml_dir]
        # the first candidate that exists and holds the splits; else the first that exists
        usable = [c for c in candidates if c.exists()]
        holds_splits = [c for c in usable if all(_split_exists(c, data.get(k)) for k in ("train", "val") if data.get(k))]
        root = (holds_splits or usable or candidates)[0]
    root = root.resolve()
    data["path"] = str(root)

    def absolute(p):
        p = Path(str(p)).expanduser()
        return str(p if p.is_absolute() else (root / p).resolve())

    for k in ("train", "val", "test", "select"):
        if data.get(k):
            data[k] = [absolute(p) for p in data[k]] if isinstance(data[k], (list, tuple)) else absolute(data[k])
            missing = [p for p in (data[k] if isinstance(data[k], list) else [data[k]]) if not Path(p).exists()]
            if missing and k in required and Path(missing[0]).stem in COCO_SPLITS:
                raise UserError(f"{where}: COCO not found at {root} (no {Path(missing[0]).name}): put COCO 2017 in "
                                f"YOLO format there (images/{{train2017,val2017}}/*.jpg, labels/{{train2017,val2017}}"
                                f"/*.txt, train2017.txt, val2017.txt, as upstream's scripts/get_coco.sh makes it) or "
                                f"point 'path' in the data yaml at it")
            if missing and k in required:
                raise UserError(f"{where}: {k} split not found at {missing[0]}: fix 'path'/'{k}' in the data yaml "
                                f"(relative paths are resolved against 'path', here {root})")
            if missing:
                LOGGER.warning(f"WARNING: {where}: {k} split not found at {missing[0]}")
        elif k in required:
            raise UserError(f"{where}: '{k}' is empty: set it to an images folder or .txt list")
    return data


# --------------------------------------------------------------------------------------------------
# Boxes


def _copy(x):
    """A float copy of a box tensor/array (integer input becomes float)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    return x.astype(np.float64) if x.dtype.kind in "biu" else x.copy()


def xyxy2xywh(x):
    """[x1, y1, x2, y2] -> [cx, cy, w, h] on the last axis (tensor or array; returns a copy)."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """[cx, cy, w, h] -> [x1, y1, x2, y2] on the last axis (tensor or array; returns a copy)."""
    y = _copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xywhn2xyxy(x, w=640, h=640, padw=0, padh=0):
    """Normalized [cx, cy, w, h] -> pixel [x1, y1, x2, y2] in a (w, h) image placed at (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w=640, h=640, clip=False, eps=0.0):
    """Pixel [x1, y1, x2, y2] -> normalized [cx, cy, w, h]; clip=True clips `x` in place first."""
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2 / w
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2 / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes, shape):
    """Clip xyxy boxes in place to an image of shape (height, width)."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy boxes (in place) from a letterboxed image of shape img1_shape (h, w) back to the
    original image of shape img0_shape (h0, w0), then clip. ratio_pad = ((gain, gain), (padw, padh))
    as the dataloader gives it in `shapes[i][1]`; without it the letterbox is recomputed."""
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = ((img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2)
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    boxes[..., [0, 2]] -= pad[0]
    boxes[..., [1, 3]] -= pad[1]
    boxes[..., :4] /= gain
    clip_boxes(boxes, img0_shape)
    return boxes


def coco80_to_coco91_class():
    """COCO category ids (1..90, with gaps) of the 80 class indices used by YOLO COCO labels."""
    return [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
            31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
            56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
            85, 86, 87, 88, 89, 90]


# --------------------------------------------------------------------------------------------------
# Non-maximum suppression


def main_head_output(prediction):
    """The (B, 4+nc, anchors) inference tensor out of a model's eval output: a tensor as is,
    `(y, x)` -> y, `([y1, y2], [d1, d2])` (dual head) -> y2, a bare `[y1, y2]` -> y2."""
    while isinstance(prediction, (list, tuple)):
        if not len(prediction):
            raise ValueError("empty model output")
        if all(isinstance(p, torch.Tensor) for p in prediction):
            prediction = prediction[-1]  # list of head outputs: the main head is the last
        else:
            prediction = prediction[0]  # (inference output, train output)
    return prediction


def non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.45, classes=None, agnostic=False,
                        multi_label=False, labels=(), max_det=300, max_nms=30000):
    """Non-maximum suppression on a batch of YOLO outputs.

    prediction: (B, 4+nc, anchors) [cx, cy, w, h, class scores...] or a model's eval output (see
    `main_head_output`). classes: keep only these class indices. agnostic: one NMS across classes
    (else class-aware, torchvision batched_nms). multi_label: one detection per (box, class) whose
    score > conf_thres (else the best class only). labels: per image (n, 5) [cls, cx, cy, w, h]
    pixel boxes added with score 1 (autolabelling). Returns a list of B (n, 6) tensors
    [x1, y1, x2, y2, conf, cls], by decreasing confidence, at most max_det each."""
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres {conf_thres} must be in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres {iou_thres} must be in [0, 1]")
    prediction = main_head_output(prediction)
    if prediction.dim() != 3 or prediction.shape[1] < 5:
        raise ValueError(f"expected a (batch, 4 + nc, anchors) prediction, got {tuple(prediction.shape)}")
    bs, nc = prediction.shape[0], prediction.shape[1] - 4
    multi_label = multi_label and nc > 1
    candidates = prediction[:, 4:].amax(1) > conf_thres  # (B, anchors)
    output = [torch.zeros((0, 6), device=prediction.device, dtype=prediction.dtype) for _ in range(bs)]
    for xi in range(bs):
        x = prediction[xi].T[candidates[xi]]  # (n, 4+nc)
        if labels is not None and len(labels) and len(labels[xi]):
            lb = torch.as_tensor(labels[xi], device=x.device, dtype=x.dtype)
            v = torch.zeros((len(lb), 4 + nc), device=x.device, dtype=x.dtype)
            v[:, :4] = lb[:, 1:5]
            v[torch.arange(len(lb), device=x.device), lb[:, 0].long() + 4] = 1.0
            x = torch.cat((x, v), 0)
        if not x.shape[0]:
            continue
        box, cls = xywh2xyxy(x[:, :4]), x[:, 4:]
        if multi_label:
            i, j = (cls > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((box[i], cls[i, j, None], j[:, None].to(x.dtype)), 1)
        else:
            conf, j = cls.max(1, keepdim=True)
            det = torch.cat((box, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            det = det[(det[:, 5:6] == torch.as_tensor(classes, device=det.device, dtype=det.dtype).view(1, -1)).any(1)]
        if not det.shape[0]:
            continue
        if det.shape[0] > max_nms:
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        boxes, scores = det[:, :4].float(), det[:, 4].float()
        if agnostic:
            keep = torchvision.ops.nms(boxes, scores, iou_thres)
        else:
            keep = torchvision.ops.batched_nms(boxes, scores, det[:, 5].long(), iou_thres)
        output[xi] = det[keep[:max_det]]
    return output
