"""Deterministic synthetic detection dataset ("demo") in YOLO format, made offline.

    python -m utils.demo_data --out datasets/demo [--n-train 1500 --n-val 1000 --n-select 300 --imgsz 320 --seed 0]

writes `<out>/images/{train,val,select}/NNNNNN.jpg`, `<out>/labels/{train,val,select}/NNNNNN.txt`,
`<out>/data.yaml` (absolute `path`, handy for tests) and the repository's `data/demo.yaml` (`--data`,
'' to skip). From Python: `generate(out_dir, n_train, n_val, imgsz, seed, n_select=0)` -> path of
`<out>/data.yaml`.

`select` is the selection split (the yaml's `select:` key, qat.evaluation.selection_split): images the
demo checkpoint never trained on, for choosing the calibration rule and the QAT model. Train images
held out instead disagree with unseen ones: the checkpoint has fitted them (measured, one QAT run: its
snapshots +0.0005..+0.0027 mAP50-95 over PTQ on both halves of val, -0.0009..-0.0030 on 200 held-out
train images).

Images: random crops / zooms / flips / colour jitter of real photos bundled with scikit-image
(offline, no download), long side `imgsz`, square or 4:3. On them, 0-9 objects of 6 classes
(CLASS_NAMES) with random size (3-45 % of the image side, a third of them small), rotation, aspect,
colour, fill (solid, gradients, stripes, noise, photo patch), outline, soft edges or transparency;
unlabelled clutter (irregular blobs, lines, arcs, letters, speckles) below and above them; then
brightness/contrast changes, blur, noise and JPEG compression.

A label is the full box of the object's drawn pixels, also where later objects or clutter hide part
of it; an object hidden for more than MAX_OCCLUDED of its area gets no label.

Determinism: image i of a split depends only on (seed, split, i), never on the number of processes,
so the same arguments give the same bytes (with the same OpenCV/NumPy builds).

Data yaml `path`: `data/demo.yaml` holds `path: datasets/demo` when the dataset is inside the
repository. A relative `path` means relative to the repository root (upstream YOLO's `ROOT / path`);
a dataset outside the repository is written with an absolute path.
"""
import importlib.util
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from utils.cli import ArgumentParser, imgsz_int, nonneg_int, positive_int

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ("circle", "rectangle", "triangle", "star", "cross", "ring")
# scikit-image's bundled photos without many class-like shapes (no coins, cup, craters, wheels, text)
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "grass.png", "gravel.png", "ihc.png", "rocket.jpg")
N_TRAIN, N_VAL = 1500, 1000  # the demo split sizes; 1000 val images keep mAP's sampling noise near 0.0005
N_SELECT = 300  # selection split: QAT's choices evaluate on it several times (demo.py's time budget)
MAX_OBJECTS = 9
MAX_OCCLUDED = 0.6  # drop the label of an object hidden for more than this fraction of its area
SPLITS = {"train": 0, "val": 1, "select": 2}  # image i of a split: rng([seed, SPLITS[split], i])
_NAME = re.compile(r"^\d{6}\.(jpg|txt)$")
_LETTERS = "ABDEFGHJKLMNPRSUVWYZ"  # no O/Q/C (rings), X/T/I (crosses, bars)

_photos = None  # per-process cache of the background photos (BGR uint8)
_noise = {}  # per-process standard normal noise tiles (float32) by side; identical in every process


def _noise_tile(h, w):
    side = 2 * max(h, w)
    if side not in _noise:
        _noise[side] = np.random.default_rng(12345).standard_normal((side, side, 3), dtype=np.float32)
    return _noise[side]


def photo_dir():
    """scikit-image's data folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo data generator needs scikit-image for its bundled photos: "
                           "pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photos():
    global _photos
    if _photos is None:
        folder, photos = photo_dir(), []
        for name in PHOTOS:
            im = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
            if im is None:
                raise RuntimeError(f"cannot read {folder / name}; reinstall scikit-image")
            photos.append(im)
        _photos = photos
    return _photos


# --- geometry ----------------------------------------------------------------------------------------

def _circle(n=48, r=1.0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack((np.cos(t), np.sin(t)), 1) * r


def shape_contours(cls, rng):
    """Contours of class `cls` in a unit frame (before aspect/rotation). Later contours are holes.
    Returns (contours, y aspect)."""
    name = CLASS_NAMES[cls]
    if name == "circle":
        return [_circle()], rng.uniform(0.8, 1.0)
    if name == "rectangle":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)], rng.uniform(0.35, 1.0)
    if name == "triangle":
        a = np.radians(90 + np.array([0, 120, 240]) + rng.uniform(-20, 20, 3))
        return [np.stack((np.cos(a), np.sin(a)), 1)], rng.uniform(0.7, 1.0)
    if name == "star":
        a = np.radians(90 + np.arange(10) * 36)
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        return [np.stack((np.cos(a) * r, np.sin(a) * r), 1)], rng.uniform(0.8, 1.0)
    if name == "cross":
        t = rng.uniform(0.22, 0.4)
        pts = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1), (-t, -1), (-t, -t), (-1, -t), (-1, t), (-t, t),
               (-t, 1)]
        return [np.array(pts, float)], rng.uniform(0.6, 1.0)
    if name == "ring":
        return [_circle(), _circle(r=rng.uniform(0.45, 0.7))[::-1]], rng.uniform(0.8, 1.0)
    raise ValueError(cls)


def place(contours, aspect, angle, size):
    """Apply aspect and rotation, scale so the longest box side is `size`; returns contours with the
    bounding box's top-left at (0, 0) and the box (w, h)."""
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    rot = np.array([[c, -s], [s, c]])
    out = [(p * (1.0, aspect)) @ rot.T for p in contours]
    lo, hi = out[0].min(0), out[0].max(0)
    k = size / (hi - lo).max()
    out = [(p - lo) * k for p in out]
    return out, (hi - lo) * k


def _rasterize(contours, offset, hw, outline=0):
    """AA mask (uint8) of the filled contours (holes cleared), plus their outline if `outline` px."""
    mask = np.zeros(hw, np.uint8)
    pts = [np.round((p + offset) * 16).astype(np.int32) for p in contours]
    cv2.fillPoly(mask, pts[:1], 255, cv2.LINE_AA, shift=4)
    if len(pts) > 1:
        cv2.fillPoly(mask, pts[1:], 0, cv2.LINE_AA, shift=4)
    if outline:
        cv2.polylines(mask, pts, True, 255, outline, cv2.LINE_AA, shift=4)
    return mask, pts


# --- colours and fills --------------------------------------------------------------------------------

def _colour(rng, avoid=None, min_dist=70.0):
    """Random BGR colour, preferring one far from `avoid` (the local background mean)."""
    best, best_d = None, -1.0
    for _ in range(8):
        c = rng.uniform(0, 255, 3)
        d = np.inf if avoid is None else float(np.linalg.norm(c - avoid))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _fill(rng, h, w, c1, c2, photos):
    """An (h, w, 3) float32 fill: solid, linear/radial gradient, stripes, smooth noise or a photo patch."""
    kind = rng.choice(6, p=[0.3, 0.2, 0.12, 0.15, 0.11, 0.12])
    if kind == 0:
        return np.broadcast_to(c1.astype(np.float32), (h, w, 3)).copy()
    if kind == 5:
        ph = photos[rng.integers(len(photos))]
        y0, x0 = rng.integers(0, ph.shape[0] - 32), rng.integers(0, ph.shape[1] - 32)
        side = int(rng.integers(32, min(ph.shape[0] - y0, ph.shape[1] - x0) + 1))
        patch = cv2.resize(ph[y0:y0 + side, x0:x0 + side], (w, h), interpolation=cv2.INTER_LINEAR)
        return (0.5 * patch + 0.5 * c1).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    if kind == 1:
        t = x * np.cos(a) + y * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 2:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        t /= max(float(t.max()), 1e-6)
    elif kind == 3:
        period = rng.uniform(3, max(4.0, max(h, w) / 3))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32)
    else:
        low = rng.random((h // 4 + 2, w // 4 + 2)).astype(np.float32)
        t = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    t = t[..., None]
    return (c1 * (1 - t) + c2 * t).astype(np.float32)


def _blend(img, x0, y0, alpha, layer):
    """img[y0:, x0:] = img * (1 - alpha) + layer * alpha over alpha's window (alpha in [0, 1])."""
    h, w = alpha.shape
    region = img[y0:y0 + h, x0:x0 + w]
    a = alpha[..., None]
    region[:] = region * (1 - a) + layer * a


# --- one image ------------------------------------------------------------------------------------------

def _background(rng, photos, h, w):
    """Random crop / zoom / flip / colour jitter of one photo (sometimes two blended) -> float32 BGR."""
    def crop(ph):
        rot, flip = rng.random() < 0.25, int(rng.choice([-1, 0, 1, 2], p=[0.15, 0.1, 0.35, 0.4]))
        out_w, out_h = (h, w) if rot else (w, h)  # a rotated crop is cut with the swapped aspect
        ph_h, ph_w = ph.shape[:2]
        ar = out_w / out_h * rng.uniform(0.85, 1.18)
        ch = min(ph_h, ph_w / ar) * rng.uniform(0.35, 1.0)
        cw = ch * ar
        y0, x0 = rng.uniform(0, ph_h - ch), rng.uniform(0, ph_w - cw)
        patch = ph[int(y0):int(y0 + ch), int(x0):int(x0 + cw)]
        interp = cv2.INTER_AREA if cw > out_w else cv2.INTER_LINEAR
        out = cv2.resize(patch, (out_w, out_h), interpolation=interp)
        if flip != 2:  # 2 = keep; else cv2.flip codes (1 horizontal, 0 vertical, -1 both)
            out = cv2.flip(out, flip)
        return cv2.rotate(out, cv2.ROTATE_90_CLOCKWISE) if rot else out

    bg = crop(photos[rng.integers(len(photos))])
    if rng.random() < 0.2:
        bg = cv2.addWeighted(bg, 0.5, crop(photos[rng.integers(len(photos))]), 0.5, 0)
    # colour jitter through lookup tables on HSV
    hue, sat, val = cv2.split(cv2.cvtColor(bg, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = np.mod(x + rng.integers(-12, 13), 180).astype(np.uint8)
    lut_s = np.clip(x * rng.uniform(0.5, 1.4), 0, 255).astype(np.uint8)
    lut_v = np.clip(x * rng.uniform(0.6, 1.3), 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    bg = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.float32)
    if rng.random() < 0.3:  # tint (also colours the grey photos)
        bg *= rng.uniform(0.7, 1.2, 3).astype(np.float32)
    if rng.random() < 0.2:  # defocused background
        bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(1.0, 3.0))
    return bg


def _clutter_mask(rng, h, w):
    """Mask (uint8, full image) of one unlabelled distractor: blob, lines, arc, letters or speckles."""
    mask = np.zeros((h, w), np.uint8)
    side = max(h, w)
    kind = rng.choice(5, p=[0.3, 0.25, 0.15, 0.15, 0.15])
    if kind == 0:  # smooth irregular blob ("potato"), never polygon-like
        a = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        k = np.arange(2, 7)[:, None]
        wobble = (rng.uniform(-1, 1, (5, 1)) * 0.35 / k ** 0.8 * np.cos(k * a + rng.uniform(0, 2 * np.pi, (5, 1))))
        wobble = wobble.sum(0)
        wobble *= 0.3 / max(float(np.ptp(wobble)), 0.3)  # radius varies by at least 30 %
        r = rng.uniform(0.03, 0.18) * side * (1 + wobble)
        c, squash = rng.uniform((0, 0), (w, h)), rng.uniform(0.4, 1.0)
        pts = np.stack((c[0] + r * np.cos(a), c[1] + r * np.sin(a) * squash), 1)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    elif kind == 1:  # polyline
        pts = rng.uniform((0, 0), (w, h), (int(rng.integers(2, 4)), 2))
        cv2.polylines(mask, [np.round(pts * 16).astype(np.int32)], False, 255, int(rng.integers(1, 4)),
                      cv2.LINE_AA, shift=4)
    elif kind == 2:  # open arc (< half a turn, so never a ring)
        c = tuple(int(v) for v in rng.uniform((0, 0), (w, h)))
        ax = tuple(int(v) for v in rng.uniform(0.04, 0.2, 2) * side)
        start = rng.uniform(0, 360)
        cv2.ellipse(mask, c, ax, rng.uniform(0, 180), start, start + rng.uniform(40, 160), 255,
                    int(rng.integers(1, 4)), cv2.LINE_AA)
    elif kind == 3:  # letters
        text = "".join(rng.choice(list(_LETTERS), int(rng.integers(1, 5))))
        org = (int(rng.uniform(0, w * 0.8)), int(rng.uniform(h * 0.1, h)))
        cv2.putText(mask, text, org, int(rng.choice([0, 2, 3, 4])), rng.uniform(0.3, 1.2) * side / 320, 255,
                    int(rng.integers(1, 3)), cv2.LINE_AA)
    else:  # speckles
        for x, y in rng.uniform((0, 0), (w, h), (int(rng.integers(10, 60)), 2)):
            cv2.circle(mask, (int(x), int(y)), int(rng.integers(1, 3)), 255, -1)
    return mask, kind


def _draw_clutter(rng, img, items, photos):
    h, w = img.shape[:2]
    mask, kind = _clutter_mask(rng, h, w)
    x0, y0, bw, bh = cv2.boundingRect(mask)
    if bw == 0 or bh == 0:
        return
    m = mask[y0:y0 + bh, x0:x0 + bw]
    avoid = img[y0:y0 + bh:4, x0:x0 + bw:4].reshape(-1, 3).mean(0)
    if kind == 0:  # blobs get a fill like the objects
        layer = _fill(rng, bh, bw, _colour(rng, avoid), _colour(rng), photos)
        _blend(img, x0, y0, m.astype(np.float32) / 255, layer)
    else:  # thin strokes: solid colour, touching only the stroke's pixels
        ys, xs = np.nonzero(m)
        a = (m[ys, xs].astype(np.float32) / 255)[:, None]
        ys, xs = ys + y0, xs + x0
        img[ys, xs] = img[ys, xs] * (1 - a) + _colour(rng, avoid).astype(np.float32) * a
    items.append((x0, y0, m >= 128, None))


def _object_size(rng, side):
    u = rng.random()
    lo, hi = (0.03, 0.08) if u < 0.33 else (0.08, 0.22) if u < 0.82 else (0.22, 0.45)
    return max(8.0, rng.uniform(lo, hi) * side)


def _draw_object(rng, img, items, boxes, photos):
    """Draw one random object; record (x0, y0, mask, class) in items and its box in boxes."""
    h, w = img.shape[:2]
    cls = int(rng.integers(len(CLASS_NAMES)))
    contours, aspect = shape_contours(cls, rng)
    size = _object_size(rng, max(h, w))
    contours, (bw, bh) = place(contours, aspect, rng.uniform(0, 360), size)
    outline = int(rng.integers(1, max(2, int(size / 15)) + 1)) if rng.random() < 0.35 else 0
    margin = outline + 2
    for _ in range(6):  # find a spot that does not bury an earlier object
        x, y = rng.uniform(1, w - bw - 1), rng.uniform(1, h - bh - 1)
        new = (x, y, x + bw, y + bh)
        if all(_overlap(b, new) < 0.5 for b in boxes):
            break
    else:
        return
    wx0, wy0 = max(0, int(x) - margin), max(0, int(y) - margin)
    wx1, wy1 = min(w, int(x + bw) + margin + 1), min(h, int(y + bh) + margin + 1)
    mask, pts = _rasterize(contours, (x - wx0, y - wy0), (wy1 - wy0, wx1 - wx0), outline)
    ys, xs = np.nonzero(mask >= 128)
    if len(xs) == 0:
        return
    box = (wx0 + xs.min(), wy0 + ys.min(), wx0 + xs.max() + 1, wy0 + ys.max() + 1)
    avoid = img[wy0:wy1:2, wx0:wx1:2].reshape(-1, 3).mean(0)
    c1 = _colour(rng, avoid, min_dist=0.0 if rng.random() < 0.08 else 70.0)
    c2 = np.clip(c1 + rng.uniform(-90, 90, 3), 0, 255) if rng.random() < 0.6 else _colour(rng)
    layer = _fill(rng, wy1 - wy0, wx1 - wx0, c1, c2, photos)
    if rng.random() < 0.3:  # light falling from one side
        ramp = np.linspace(rng.uniform(0.6, 0.9), 1.15, wx1 - wx0, dtype=np.float32)
        layer *= (ramp if rng.random() < 0.5 else ramp[::-1])[None, :, None]
    if outline:
        colour = _colour(rng, c1) if rng.random() < 0.6 else np.full(3, rng.choice([20.0, 235.0]))
        colour = tuple(float(v) for v in colour)
        cv2.polylines(layer, pts, True, colour, outline, cv2.LINE_AA, shift=4)
    alpha = mask.astype(np.float32) / 255
    if rng.random() < 0.15:  # soft (defocused) edges
        alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(0.6, 1.6))
    if rng.random() < 0.1:  # semi-transparent
        alpha *= rng.uniform(0.6, 0.85)
    _blend(img, wx0, wy0, alpha, layer)
    items.append((wx0, wy0, mask >= 128, cls))
    boxes.append(box)


def _overlap(old, new):
    """Fraction of box `old` covered by box `new`."""
    iw = min(old[2], new[2]) - max(old[0], new[0])
    ih = min(old[3], new[3]) - max(old[1], new[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((old[2] - old[0]) * (old[3] - old[1]))


def render(seed, split, index, imgsz):
    """-> (BGR uint8 image, labels [(cls, x1, y1, x2, y2)], number of labels dropped for occlusion)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    photos = load_photos()
    short = imgsz if rng.random() < 0.6 else int(round(imgsz * 0.75))
    h, w = (short, imgsz) if rng.random() < 0.7 else (imgsz, short)
    img = _background(rng, photos, h, w)
    items, boxes = [], []
    n_obj = 0 if rng.random() < 0.03 else int(rng.integers(1, MAX_OBJECTS + 1))
    n_under, n_over = int(rng.integers(1, 5)), int(rng.integers(0, 4))
    for _ in range(n_under):
        _draw_clutter(rng, img, items, photos)
    for _ in range(n_obj):
        _draw_object(rng, img, items, boxes, photos)
    for _ in range(n_over):
        _draw_clutter(rng, img, items, photos)

    # visibility: walk from the top layer down, accumulating what covers each item
    cover = np.zeros((h, w), bool)
    keep, k = [], len(boxes)
    for x0, y0, m, cls in reversed(items):
        win = cover[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
        if cls is not None:
            k -= 1
            visible = np.count_nonzero(m & ~win) / max(np.count_nonzero(m), 1)
            if visible >= 1 - MAX_OCCLUDED:
                keep.append((cls, *boxes[k]))
        win |= m
    labels = keep[::-1]

    img *= rng.uniform(0.7, 1.3)  # contrast
    img += rng.uniform(-30, 30) + 0.5  # brightness (+ 0.5 rounds in the cast below)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.3))
    if rng.random() < 0.6:  # sensor noise: a random window of a fixed noise tile, scaled
        tile = _noise_tile(h, w)
        y0, x0 = rng.integers(0, tile.shape[0] - h + 1), rng.integers(0, tile.shape[1] - w + 1)
        img += tile[y0:y0 + h, x0:x0 + w] * np.float32(rng.uniform(2, 10))
    img = np.clip(img, 0, 255, out=img).astype(np.uint8)
    return img, labels, len(boxes) - len(labels)


def _write_one(task):
    out, split, index, imgsz, seed = task
    img, labels, dropped = render(seed, split, index, imgsz)
    quality = int(np.random.default_rng([seed, SPLITS[split], index, 1]).integers(60, 96))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    name = f"{index:06d}"
    (Path(out) / "images" / split / f"{name}.jpg").write_bytes(buf.tobytes())
    h, w = img.shape[:2]
    lines = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
             for c, x1, y1, x2, y2 in labels]
    (Path(out) / "labels" / split / f"{name}.txt").write_text("".join(lines))
    return [c for c, *_ in labels], dropped


def _init_worker():
    cv2.setNumThreads(1)
    load_photos()


def _yaml_text(path, header, select=False):
    names = ", ".join(CLASS_NAMES)
    select_line = "select: images/select  # images the checkpoint never trained on: QAT's selection split\n" \
        if select else ""
    return (f"# {header}\n"
            f"# Relative `path` = relative to the repository root (upstream convention); see utils/demo_data.py\n"
            f"path: {path}\ntrain: images/train\nval: images/val\n{select_line}\nnc: {len(CLASS_NAMES)}\n"
            f"names: [{names}]\n")


def generate(out_dir, n_train=N_TRAIN, n_val=N_VAL, imgsz=320, seed=0, workers=1, n_select=0):
    """Write the dataset to `out_dir` (replacing images/labels it made before) -> `out_dir/data.yaml`.
    n_select > 0 adds the selection split (`select:` in the yaml)."""
    out = Path(out_dir).resolve()
    counts, n_dropped = np.zeros(len(CLASS_NAMES), int), 0
    tasks = []
    for split, n in (("train", n_train), ("val", n_val)) + ((("select", n_select),) if n_select else ()):
        for sub in ("images", "labels"):
            d = out / sub / split
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                if _NAME.match(f.name):
                    f.unlink()
        (out / "labels" / f"{split}.cache").unlink(missing_ok=True)
        tasks += [(str(out), split, i, imgsz, seed) for i in range(n)]
    if workers > 1 and len(tasks) >= 64:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            results = list(pool.imap_unordered(_write_one, tasks, chunksize=16))
    else:
        results = [_write_one(t) for t in tasks]
    for classes, dropped in results:
        np.add.at(counts, classes, 1)
        n_dropped += dropped
    select = f" + {n_select} select" if n_select else ""
    header = (f"demo data: seed {seed}, {n_train} train + {n_val} val{select} images at {imgsz} px, boxes per class "
              f"{dict(zip(CLASS_NAMES, counts.tolist()))}, {n_dropped} hidden objects unlabelled")
    yaml_path = out / "data.yaml"
    yaml_path.write_text(_yaml_text(out.as_posix(), header, select=n_select > 0))
    return yaml_path


def write_repo_yaml(data_yaml, out_dir, header, select=False):
    """Write `data_yaml` pointing at `out_dir`: relative to the repository root when inside it."""
    out = Path(out_dir).resolve()
    try:
        path = out.relative_to(ROOT).as_posix()
    except ValueError:
        path = out.as_posix()
    Path(data_yaml).parent.mkdir(parents=True, exist_ok=True)
    Path(data_yaml).write_text(_yaml_text(path, header, select))


def parse_opt(argv=None):
    p = ArgumentParser(description="Write the synthetic demo detection dataset (YOLO format).")
    p.add_argument("--out", default="datasets/demo", help="output folder")
    p.add_argument("--n-train", type=nonneg_int, default=N_TRAIN)
    p.add_argument("--n-val", type=nonneg_int, default=N_VAL)
    p.add_argument("--n-select", type=nonneg_int, default=N_SELECT,
                   help="selection split: images the checkpoint never trained on (0: none)")
    p.add_argument("--imgsz", type=imgsz_int, default=320, help="long side of every image, px")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1), help="processes")
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"), help="data yaml to write ('' = none)")
    return p.parse_args(argv)


def main(argv=None):
    opt = parse_opt(argv)
    try:
        load_photos()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    yaml_path = generate(opt.out, opt.n_train, opt.n_val, opt.imgsz, opt.seed, workers=opt.workers,
                         n_select=opt.n_select)
    header = yaml_path.read_text().splitlines()[0][2:]
    if opt.data:
        write_repo_yaml(opt.data, opt.out, header, select=opt.n_select > 0)
    print(f"{header}\nwrote {Path(opt.out).resolve()} in {time.time() - t0:.1f}s"
          + (f", data yaml {opt.data}" if opt.data else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
