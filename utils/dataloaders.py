"""YOLO-format detection dataset and its DataLoader.

Layout: images anywhere under an `images` folder, labels in the matching `labels` folder (the last
`/images/` component of the path becomes `/labels/`, the suffix `.txt`); one `class cx cy w h` line per
object, normalized to the image. A polygon line (`class x1 y1 x2 y2 ...`, at least 3 points, as in
upstream's COCO segment labels) is turned into its bounding box. An image without a label file is a
background image.

Sources: a folder of images (searched recursively), a .txt file listing image paths (relative ones
are resolved against the .txt's folder), or a list of those.

Scanning checks every image and label line once and stores the result in a cache beside the labels:
`<labels dir>.cache` (or `<list>.cache` for a .txt source). The cache is a NumPy .npz archive of
plain arrays, read with `allow_pickle=False`; it is rebuilt when the hash of the file list, sizes and
mtimes changes. Unreadable images and malformed label lines are skipped and counted in one warning.
Images that decode to pixel types the pipeline cannot take (32-bit integer or float TIFFs, say) count
as corrupt; an unreadable or truncated cache is rebuilt.

Class ids are checked against the dataset's `nc` (pass `nc=` to create_dataloader, as train.py,
val.py and train_qat.py do): a label whose class is >= nc (`7` with 6 classes, `1e10`) is skipped and
counted like any other bad line, with a warning that names the first file holding one, so that
neither a training nor an evaluation ever sees a class the model does not predict.
"""
import hashlib
import os
import random
import zipfile
import zlib
from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, distributed
from tqdm import tqdm

from utils.augmentations import (augment_hsv, letterbox, mixup, random_perspective, xyxy_to_xywhn,
                                 xywhn_to_xyxy)
from utils.general import LOGGER, UserError

IMG_FORMATS = ("bmp", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp")
CACHE_VERSION = 1
NUM_THREADS = max(1, min(8, os.cpu_count() or 1))
RANK = int(os.getenv("RANK", -1))
MIN_IMAGE_SIDE = 10  # px; smaller images are treated as corrupt
COORD_EPS = 1e-6  # tolerance for label coordinates slightly outside [0, 1] (rounding)


# --- paths ------------------------------------------------------------------------------------------

def img2label_paths(img_paths):
    """Label file for each image: last `/images/` -> `/labels/`, suffix -> `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    out = []
    for p in img_paths:
        head, sep, tail = str(p).rpartition(sa)
        p = head + sb + tail if sep else tail
        out.append(os.path.splitext(p)[0] + ".txt")
    return out


def _is_image(p):
    return os.path.splitext(str(p))[1][1:].lower() in IMG_FORMATS


def list_image_files(path, prefix=""):
    """Image paths (sorted, absolute) from a folder, a .txt list of paths, or a list of those."""
    sources = path if isinstance(path, (list, tuple)) else [path]
    files = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files += [str(f.resolve()) for f in p.rglob("*.*") if _is_image(f)]
        elif p.is_file() and p.suffix.lower() == ".txt":
            parent = p.resolve().parent
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if line:
                    q = Path(line).expanduser()
                    files.append(str(q if q.is_absolute() else (parent / q).resolve()))
        elif p.is_file() and _is_image(p):
            files.append(str(p.resolve()))
        else:
            raise UserError(f"{prefix}{src} does not exist (expected a folder of images or a .txt list of images)")
    files = sorted({f for f in files if _is_image(f)})
    if not files:
        raise UserError(f"{prefix}no images found in {', '.join(str(s) for s in sources)}")
    return files


def get_hash(paths):
    """Hash of a file list with every file's size and mtime (a missing file hashes as such)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


# --- verification of one image / label pair ----------------------------------------------------------

def _image_size(im_file):
    """(w, h) after EXIF orientation, or raise for an unreadable / truncated / tiny image."""
    with Image.open(im_file) as im:
        im.verify()  # cheap structural check
    with Image.open(im_file) as im:
        w, h = im.size
        fmt = (im.format or "").lower()
        mode = im.mode
        orientation = im.getexif().get(0x0112, 1)
    if fmt not in IMG_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")
    if mode == "F" or (mode == "I" and fmt == "tiff"):  # float32 / int32 samples: cv2.imread returns None
        raise ValueError(f"unsupported pixel type {'float' if mode == 'F' else '32-bit integer'} (use 8 or 16 bits)")
    if orientation in (5, 6, 7, 8):  # rotated 90 degrees; cv2.imread applies the rotation too
        w, h = h, w
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise ValueError(f"image size {w}x{h} smaller than {MIN_IMAGE_SIDE} px")
    if fmt in ("jpeg", "mpo"):
        with open(im_file, "rb") as f:
            f.seek(-2, 2)
            complete = f.read() == b"\xff\xd9"
        if not complete:  # no end-of-image marker: a full decode tells truncation from trailing bytes
            with Image.open(im_file) as im:
                im.load()
    return w, h


def parse_label_lines(lines):
    """Parse label text lines -> ((n, 5) float32 [cls, cx, cy, w, h], number of bad lines).

    A line is bad when: its column count is neither 5 nor 1 + an even number >= 6 (a polygon),
    a value is not a finite number, the class is negative or not an integer, a coordinate is outside
    [0, 1], or the box has no width/height. Blank lines are ignored, duplicate rows are dropped.
    """
    rows, bad = [], 0
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
            bad += 1
            continue
        try:
            values = np.array([float(v) for v in parts], dtype=np.float64)
        except ValueError:
            bad += 1
            continue
        cls, coords = values[0], values[1:]
        if (not np.isfinite(values).all() or cls < 0 or cls != int(cls)
                or (coords < -COORD_EPS).any() or (coords > 1 + COORD_EPS).any()):
            bad += 1
            continue
        coords = coords.clip(0, 1)
        if len(parts) == 5:
            box = coords
        else:  # polygon -> bounding box
            xs, ys = coords[0::2], coords[1::2]
            box = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2,
                            xs.max() - xs.min(), ys.max() - ys.min()])
        if box[2] <= 0 or box[3] <= 0:
            bad += 1
            continue
        rows.append([cls, *box])
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    if len(labels) > 1:
        _, first = np.unique(labels, axis=0, return_index=True)
        labels = labels[np.sort(first)]
    return labels, bad


def verify_image_label(args):
    """Check one pair. Returns dict(ok, shape (w, h), labels, bad_lines, missing, problem)."""
    im_file, lb_file = args
    out = {"ok": False, "shape": (0, 0), "labels": np.zeros((0, 5), np.float32), "bad_lines": 0,
           "missing": False, "problem": ""}
    try:
        out["shape"] = _image_size(im_file)
    except Exception as e:  # noqa: BLE001 - any decoder error means "corrupt image"
        out["problem"] = f"{im_file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        return out
    out["ok"] = True
    if os.path.isfile(lb_file):
        try:
            with open(lb_file, encoding="utf-8", errors="replace") as f:
                out["labels"], out["bad_lines"] = parse_label_lines(f.read().splitlines())
        except OSError as e:
            out["bad_lines"] = 1
            out["problem"] = f"{lb_file}: {e}"
        if out["bad_lines"] and not out["problem"]:
            out["problem"] = f"{lb_file}: {out['bad_lines']} bad line(s)"
    else:
        out["missing"] = True
    return out


# --- label cache (.npz of plain arrays, never pickled) -------------------------------------------------

def save_cache(path, cache):
    """Write the cache atomically; a read-only dataset folder only costs a warning."""
    path = Path(path)
    if not path.parent.is_dir():
        LOGGER.warning(f"WARNING: no label folder {path.with_suffix('')}: every image is a background image "
                       f"(no labels); labels not cached")
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **cache)
        os.replace(tmp, path)
    except OSError as e:
        LOGGER.warning(f"WARNING: cache folder {path.parent} is not writeable, labels not cached ({e})")
        try:
            tmp.unlink()
        except OSError:
            pass


def load_cache(path, expected_hash):
    """The cache's arrays as a dict, or None when missing, unreadable, stale or of another version."""
    try:
        with np.load(path, allow_pickle=False) as z:
            cache = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):  # truncated, garbage
        return None
    try:
        if int(cache["version"]) != CACHE_VERSION or str(cache["hash"]) != expected_hash:
            return None
    except (KeyError, ValueError, TypeError):
        return None
    return cache


def _build_cache(im_files, label_files, prefix, show_progress):
    ok_files, shapes, counts, labels = [], [], [], []
    n_missing = n_empty = n_corrupt = n_bad = 0
    problem = ""
    desc = f"{prefix}Scanning images and labels"
    with ThreadPool(NUM_THREADS) as pool:
        results = pool.imap(verify_image_label, zip(im_files, label_files), chunksize=16)
        bar = tqdm(results, desc=desc, total=len(im_files), disable=not show_progress, unit="img")
        for im_file, r in zip(im_files, bar):
            problem = problem or r["problem"]
            n_bad += r["bad_lines"]
            if not r["ok"]:
                n_corrupt += 1
                continue
            n_missing += r["missing"]
            n_empty += (not r["missing"]) and len(r["labels"]) == 0
            ok_files.append(im_file)
            shapes.append(r["shape"])
            counts.append(len(r["labels"]))
            labels.append(r["labels"])
            bar.set_description(f"{desc}: {len(ok_files)} ok, {n_missing} backgrounds, "
                                f"{n_corrupt} corrupt")
        bar.close()
    return {
        "version": np.array(CACHE_VERSION),
        "im_files": np.array(ok_files, dtype=str),
        "shapes": np.array(shapes, dtype=np.int64).reshape(-1, 2),
        "counts": np.array(counts, dtype=np.int64),
        "labels": np.concatenate(labels, 0) if labels else np.zeros((0, 5), np.float32),
        "stats": np.array([len(ok_files), n_missing, n_empty, n_corrupt, n_bad], dtype=np.int64),
        "problem": np.array(problem, dtype=str),
    }


def _drop_classes_from(labels, im_files, nc):
    """Remove (in place) label rows whose class is >= nc -> (rows removed, first image holding one)."""
    n_out, first = 0, None
    for i, lb in enumerate(labels):
        keep = lb[:, 0] < nc
        if not keep.all():
            n_out += int((~keep).sum())
            first = first or im_files[i]
            labels[i] = lb[keep]
    return n_out, first


# --- dataset -----------------------------------------------------------------------------------------

class LoadImagesAndLabels(Dataset):
    """Images + labels with upstream's training augmentation (mosaic, mixup, affine, HSV, flips)
    and rectangular batches for evaluation.

    `labels[i]` is an (n, 5) float32 array `[cls, cx, cy, w, h]` (normalized), `shapes[i]` is the
    original `(w, h)` (upstream order). `__getitem__` returns `(img uint8 (3, H, W) RGB, targets (n, 6)
    [0, cls, cx, cy, w, h], path, shapes)` with `shapes = ((h0, w0), ((h / h0, w / w0), pad))`, or None
    for a mosaic. The image index in column 0 of the targets is filled by `collate_fn`.

    Changing an attribute such as `mosaic` takes effect for the next epoch: the DataLoader made by
    `create_dataloader` starts fresh workers (with a fresh copy of the dataset) every epoch.
    """

    def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False, stride=32,
                 pad=0.0, single_cls=False, prefix="", rank=-1, nc=None):
        self.img_size = img_size
        self.augment = augment
        self.hyp = dict(hyp or {})
        self.rect = rect
        self.mosaic = augment and not rect  # mosaic makes square images; rect batches would be wasted
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.prefix = prefix

        all_files = list_image_files(path, prefix)
        all_labels = img2label_paths(all_files)
        src = path[0] if isinstance(path, (list, tuple)) else path
        src = Path(src)
        if src.is_file() and src.suffix.lower() == ".txt":
            cache_path = src.with_suffix(".cache")
        else:
            cache_path = Path(all_labels[0]).parent.with_suffix(".cache")
        self.cache_path = cache_path
        h = get_hash(all_labels + all_files)
        cache = load_cache(cache_path, h)
        if cache is None:
            cache = _build_cache(all_files, all_labels, prefix, show_progress=rank in (-1, 0))
            cache["hash"] = np.array(h, dtype=str)
            if rank in (-1, 0):
                save_cache(cache_path, cache)
        n_ok, n_missing, n_empty, n_corrupt, n_bad = (int(v) for v in cache["stats"])
        self.im_files = [str(f) for f in cache["im_files"]]
        splits = np.cumsum(cache["counts"])[:-1]
        self.labels = [lb.copy() for lb in np.split(cache["labels"].astype(np.float32), splits)]
        if nc is not None and not single_cls:  # single_cls: every class becomes class 0 below
            n_out, first = _drop_classes_from(self.labels, self.im_files, int(nc))
            n_bad += n_out
            if n_out and rank in (-1, 0):
                LOGGER.warning(f"WARNING: {prefix}skipped {n_out} label{'s' * (n_out != 1)} of a class >= nc={nc} "
                               f"(the data yaml's names; first in {img2label_paths([first])[0]})")
        if rank in (-1, 0):
            if n_corrupt or n_bad:
                LOGGER.warning(f"WARNING: {prefix}skipped {n_corrupt} corrupt image{'s' * (n_corrupt != 1)}, "
                               f"{n_bad} bad label line{'s' * (n_bad != 1)} (first: {cache['problem']})")
            LOGGER.info(f"{prefix}{n_ok} images ({n_missing} without labels, {n_empty} empty label files), "
                        f"{len(cache['labels'])} boxes; cache {cache_path}")
        if n_ok == 0:
            raise UserError(f"{prefix}no usable images in {path}: {len(all_files)} found, {n_corrupt} corrupt")

        self.label_files = img2label_paths(self.im_files)
        self.shapes = cache["shapes"].astype(np.float64)  # (w, h)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.indices = np.arange(self.n)
        self.batch = np.floor(np.arange(self.n) / batch_size).astype(int)  # batch index of each image
        if rect:
            self._make_rect_batches(batch_size, img_size, stride, pad)

    def _make_rect_batches(self, batch_size, img_size, stride, pad):
        """Sort images by aspect ratio and give each batch the smallest stride-multiple shape that
        fits all its images at `img_size` (plus `pad` strides)."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = aspect.argsort(kind="stable")
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]
        aspect = aspect[order]
        n_batches = int(self.batch[-1]) + 1
        rel = np.ones((n_batches, 2))  # (h, w) relative to img_size
        for b in range(n_batches):
            ar = aspect[self.batch == b]
            if ar.max() < 1:  # all wide: full width, height of the tallest
                rel[b] = [ar.max(), 1]
            elif ar.min() > 1:  # all tall: full height, width of the widest
                rel[b] = [1, 1 / ar.min()]
        self.batch_shapes = (np.ceil(rel * img_size / stride + pad).astype(int) * stride)

    def __len__(self):
        return self.n

    def load_image(self, i):
        """Image i (BGR) resized so its long side is img_size -> (im, (h0, w0), (h, w))."""
        f = self.im_files[i]
        im = cv2.imread(f)
        if im is None:  # vanished or changed since the scan
            raise UserError(f"{self.prefix}cannot read image {f} (it passed the scan; was it changed?)")
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA
            im = cv2.resize(im, (max(1, round(w0 * r)), max(1, round(h0 * r))), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def load_mosaic(self, index):
        """Four images around a random centre on a 2s x 2s canvas, then a random affine down to s x s.
        Returns (im, labels (n, 5) [cls, x1, y1, x2, y2] px)."""
        s = self.img_size
        yc, xc = (int(random.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        canvas = np.full((2 * s, 2 * s, 3), 114, dtype=np.uint8)
        all_labels = []
        for k, idx in enumerate([index] + random.choices(self.indices, k=3)):
            im, _, (h, w) = self.load_image(idx)
            if k == 0:  # top left
                x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
                x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
            elif k == 1:  # top right
                x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
                x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
            elif k == 2:  # bottom left
                x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
            else:  # bottom right
                x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
                x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
            canvas[y1a:y2a, x1a:x2a] = im[y1b:y2b, x1b:x2b]
            labels = self.labels[idx].copy()
            if len(labels):
                labels[:, 1:] = xywhn_to_xyxy(labels[:, 1:], w, h, padw=x1a - x1b, padh=y1a - y1b)
            all_labels.append(labels)
        labels = np.concatenate(all_labels, 0)
        labels[:, 1:] = labels[:, 1:].clip(0, 2 * s)
        hyp = self.hyp
        return random_perspective(canvas, labels, degrees=hyp.get("degrees", 0.0),
                                  translate=hyp.get("translate", 0.0), scale=hyp.get("scale", 0.0),
                                  shear=hyp.get("shear", 0.0), perspective=hyp.get("perspective", 0.0),
                                  border=self.mosaic_border)

    def __getitem__(self, index):
        index = int(self.indices[index])
        hyp = self.hyp
        shapes = None
        if self.mosaic and random.random() < hyp.get("mosaic", 1.0):
            im, labels = self.load_mosaic(index)
            if random.random() < hyp.get("mixup", 0.0):
                im, labels = mixup(im, labels, *self.load_mosaic(random.randint(0, self.n - 1)))
        else:
            im, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            im, ratio, pad = letterbox(im, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)
            labels = self.labels[index].copy()
            if len(labels):
                labels[:, 1:] = xywhn_to_xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                im, labels = random_perspective(im, labels, degrees=hyp.get("degrees", 0.0),
                                                translate=hyp.get("translate", 0.0), scale=hyp.get("scale", 0.0),
                                                shear=hyp.get("shear", 0.0),
                                                perspective=hyp.get("perspective", 0.0))
        labels = np.asarray(labels, dtype=np.float32).reshape(-1, 5)
        if len(labels):
            labels[:, 1:5] = xyxy_to_xywhn(labels[:, 1:5], w=im.shape[1], h=im.shape[0], clip=True, eps=1e-3)
        if self.augment:
            augment_hsv(im, hgain=hyp.get("hsv_h", 0.0), sgain=hyp.get("hsv_s", 0.0), vgain=hyp.get("hsv_v", 0.0))
            if random.random() < hyp.get("flipud", 0.0):
                im = np.flipud(im)
                labels[:, 2] = 1 - labels[:, 2]
            if random.random() < hyp.get("fliplr", 0.0):
                im = np.fliplr(im)
                labels[:, 1] = 1 - labels[:, 1]
        targets = torch.zeros((len(labels), 6))
        targets[:, 1:] = torch.from_numpy(labels)
        im = np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(im), targets, self.im_files[index], shapes

    @staticmethod
    def collate_fn(batch):
        ims, targets, paths, shapes = zip(*batch)
        for i, t in enumerate(targets):
            t[:, 0] = i  # image index within the batch
        return torch.stack(ims, 0), torch.cat(targets, 0), list(paths), shapes


# --- loader ------------------------------------------------------------------------------------------

@contextmanager
def _rank_zero_first(rank):
    """Let rank 0 scan (and write the cache) before the other DDP ranks read it."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist and rank not in (-1, 0):
        torch.distributed.barrier()
    yield
    if dist and rank == 0:
        torch.distributed.barrier()


def seed_worker(worker_id):
    """Seed `random` and NumPy in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def create_dataloader(path, imgsz, batch_size, stride, hyp=None, augment=False, pad=0.0, rect=False, rank=-1,
                      workers=8, shuffle=False, prefix="", seed=0, single_cls=False, nc=None):
    """-> (DataLoader, LoadImagesAndLabels). DDP (rank != -1) uses a DistributedSampler; call
    `loader.sampler.set_epoch(epoch)` each epoch as usual. `nc`: labels of class >= nc are
    skipped and counted as bad lines."""
    if rect and shuffle:
        LOGGER.warning(f"WARNING: {prefix}rect=True is incompatible with shuffle, setting shuffle=False")
        shuffle = False
    with _rank_zero_first(rank):
        dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                                      stride=int(stride), pad=pad, single_cls=single_cls, prefix=prefix, rank=rank,
                                      nc=nc)
    batch_size = min(batch_size, len(dataset))
    n_dev = torch.cuda.device_count()
    nw = min((os.cpu_count() or 1) // max(n_dev, 1), batch_size if batch_size > 1 else 0, workers)
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, shuffle=shuffle)
    generator = torch.Generator()
    generator.manual_seed(6148914691236517205 + seed + max(rank, 0))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw,
                        sampler=sampler, pin_memory=torch.cuda.is_available(),
                        collate_fn=LoadImagesAndLabels.collate_fn, worker_init_fn=seed_worker,
                        generator=generator)
    return loader, dataset

