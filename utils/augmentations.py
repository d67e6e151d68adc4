"""Image augmentations for detection: letterbox, HSV jitter, random affine/perspective, mixup.

Boxes handled here are pixel `[cls, x1, y1, x2, y2]` rows (numpy, float). Randomness comes from
Python's `random` and NumPy's global generator, like upstream, so that `utils.dataloaders`' worker
seeding makes a run reproducible. Flips are done by the dataset on normalized labels.
"""
import math
import random

import cv2
import numpy as np

PAD_VALUE = 114  # grey used for every padded / uncovered pixel


def letterbox(im, new_shape=(640, 640), color=(114, 114, 114), auto=True, scaleFill=False, scaleup=True,
              stride=32):
    """Resize `im` (HWC) keeping its aspect ratio, then pad it to `new_shape` (h, w).

    auto: pad only up to the next multiple of `stride` (minimum rectangle) instead of the full shape.
    scaleFill: stretch to `new_shape` with no padding. scaleup: allow enlarging (False: only shrink).
    Returns `(im, (ratio_w, ratio_h), (dw, dh))` where dw/dh are the (fractional) left/top paddings.
    """
    h0, w0 = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    w1, h1 = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = new_shape[1] - w1, new_shape[0] - h1
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scaleFill:
        dw, dh = 0.0, 0.0
        w1, h1 = new_shape[1], new_shape[0]
        ratio = (new_shape[1] / w0, new_shape[0] / h0)
    dw, dh = dw / 2, dh / 2  # split the padding between both sides
    if (w0, h0) != (w1, h1):
        im = cv2.resize(im, (w1, h1), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if top or bottom or left or right:
        im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)


def augment_hsv(im, hgain=0.5, sgain=0.5, vgain=0.5):
    """Randomly scale hue, saturation and value of a BGR uint8 image, in place."""
    if not (hgain or sgain or vgain):
        return im
    gains = np.random.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    h, s, v = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_h = np.mod(x * gains[0], 180).astype(np.uint8)  # OpenCV hue lives in [0, 180)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(h, lut_h), cv2.LUT(s, lut_s), cv2.LUT(v, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(box1, box2, wh_thr=2, ar_thr=100, area_thr=0.1, eps=1e-16):
    """Which transformed boxes to keep. box1: boxes before (scaled by the augment's zoom), box2:
    after, both (4, n) x1y1x2y2. Keep boxes wider/taller than `wh_thr` px, keeping more than
    `area_thr` of their area, with an aspect ratio below `ar_thr`."""
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def _affine_matrix(in_hw, out_hw, degrees, translate, scale, shear, perspective):
    """Random 3x3 warp: centre the input, perspective, rotate+zoom, shear, move into the output."""
    h, w = in_hw
    out_h, out_w = out_hw
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -w / 2, -h / 2
    persp = np.eye(3)
    persp[2, 0] = random.uniform(-perspective, perspective)
    persp[2, 1] = random.uniform(-perspective, perspective)
    rot = np.eye(3)
    zoom = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=random.uniform(-degrees, degrees), scale=zoom)
    shr = np.eye(3)
    shr[0, 1] = math.tan(math.radians(random.uniform(-shear, shear)))
    shr[1, 0] = math.tan(math.radians(random.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_h
    return move @ shr @ rot @ persp @ centre, zoom


def random_perspective(im, targets=(), degrees=10, translate=0.1, scale=0.1, shear=10, perspective=0.0,
                       border=(0, 0)):
    """Random affine (or perspective) warp of `im` and its `targets` (n, 5) [cls, x1, y1, x2, y2] px.

    `border` (dy, dx) grows (positive) or crops (negative) the output: a mosaic canvas of 2s x 2s with
    border (-s/2, -s/2) comes out s x s. Each warped box is the bounding box of its warped corners,
    clipped to the output; boxes that become too small/thin or lose most of their area are dropped.
    Returns `(im, targets)`.
    """
    out_h, out_w = im.shape[0] + 2 * border[0], im.shape[1] + 2 * border[1]
    M, zoom = _affine_matrix(im.shape[:2], (out_h, out_w), degrees, translate, scale, shear, perspective)
    if border[0] or border[1] or not np.array_equal(M, np.eye(3)):
        fill = (PAD_VALUE,) * 3
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(out_w, out_h), borderValue=fill)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(out_w, out_h), borderValue=fill)

    targets = np.asarray(targets, dtype=np.float32).reshape(-1, 5)
    n = len(targets)
    if n:
        # the four corners of every box, as homogeneous points (4n, 3)
        corners = np.ones((n * 4, 3))
        corners[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1 x2y2 x1y2 x2y1
        corners = corners @ M.T
        xy = corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]
        xy = xy.reshape(n, 8)
        xs, ys = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        boxes = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, out_w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(targets[:, 1:5].T * zoom, boxes.T, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = boxes[keep]
    return im, targets


def mixup(im, labels, im2, labels2):
    """Blend two same-size images (weight ~ Beta(32, 32)) and concatenate their labels."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


# --- box format helpers (numpy, private to the data pipeline) -------------------------------------

def xywhn_to_xyxy(x, w, h, padw=0.0, padh=0.0):
    """Normalized (n, 4) cx cy w h -> pixel x1 y1 x2 y2 on a w x h image shifted by (padw, padh)."""
    y = np.empty_like(x)
    y[:, 0] = w * (x[:, 0] - x[:, 2] / 2) + padw
    y[:, 1] = h * (x[:, 1] - x[:, 3] / 2) + padh
    y[:, 2] = w * (x[:, 0] + x[:, 2] / 2) + padw
    y[:, 3] = h * (x[:, 1] + x[:, 3] / 2) + padh
    return y


def xyxy_to_xywhn(x, w, h, clip=True, eps=0.0):
    """Pixel (n, 4) x1 y1 x2 y2 -> normalized cx cy w h, optionally clipped to the image first."""
    x = np.array(x, dtype=np.float32, copy=True)
    if clip:
        x[:, [0, 2]] = x[:, [0, 2]].clip(0, w - eps)
        x[:, [1, 3]] = x[:, [1, 3]].clip(0, h - eps)
    y = np.empty_like(x)
    y[:, 0] = (x[:, 0] + x[:, 2]) / 2 / w
    y[:, 1] = (x[:, 1] + x[:, 3]) / 2 / h
    y[:, 2] = (x[:, 2] - x[:, 0]) / w
    y[:, 3] = (x[:, 3] - x[:, 1]) / h
    return y
