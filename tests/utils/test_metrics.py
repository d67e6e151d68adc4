"""Tests for utils.metrics: IoU, matching, AP (hand-computed cases and pycocotools' COCOeval)."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch

from utils.metrics import (ConfusionMatrix, ap_per_class, bbox_iou, box_iou, compute_ap, fitness,
                           process_batch)

IOUV = torch.linspace(0.5, 0.95, 10)


# ---------------------------------------------------------------------------------------------
# IoU
def test_box_iou_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    expected = torch.tensor([[25 / 175, 1.0, 0.0], [0.0, 16 / 100, 0.0]])
    assert torch.allclose(box_iou(a, b), expected)


def test_bbox_iou_variants():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0]])
    iou = bbox_iou(a, b, xywh=False)
    assert iou.shape == (1, 1) and iou.item() == pytest.approx(25 / 175, abs=1e-6)
    # same boxes as cx, cy, w, h
    assert bbox_iou(torch.tensor([[5.0, 5.0, 10.0, 10.0]]), torch.tensor([[10.0, 10.0, 10.0, 10.0]])).item() == \
        pytest.approx(25 / 175, abs=1e-6)
    # GIoU: enclosing box 15x15 = 225, union 175
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(25 / 175 - 50 / 225, abs=1e-6)
    # DIoU: centre distance^2 = 50, enclosing diagonal^2 = 450
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(25 / 175 - 50 / 450, abs=1e-6)
    # CIoU equals DIoU when the aspect ratios agree
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(25 / 175 - 50 / 450, abs=1e-6)
    c = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    i = 100 / 200
    assert bbox_iou(a, c, xywh=False, CIoU=True).item() == pytest.approx(i - (25 / 500 + v * v / (v - i + 1)), abs=1e-5)
    assert bbox_iou(a, a, xywh=False, CIoU=True).item() == pytest.approx(1.0, abs=1e-6)
    # broadcasting as the assigner uses it: (b, n, 1, 4) x (b, 1, m, 4) -> (b, n, m, 1)
    g = torch.rand(2, 3, 1, 4) * 10
    g[..., 2:] += g[..., :2]
    p = torch.rand(2, 1, 5, 4) * 10
    p[..., 2:] += p[..., :2]
    out = bbox_iou(g, p, xywh=False)
    assert out.shape == (2, 3, 5, 1)
    assert torch.allclose(out[0, :, :, 0], box_iou(g[0, :, 0], p[0, 0]), atol=1e-5)


def test_bbox_iou_ciou_gradient_flows():
    a = torch.tensor([[1.0, 1.0, 9.0, 12.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    (1 - bbox_iou(a, b, xywh=False, CIoU=True)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# matching
def test_process_batch_confident_detection_wins():
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [1.0, 50.0, 50.0, 60.0, 60.0]])
    dets = torch.tensor([  # in NMS order: descending confidence
        [0.0, 0.0, 10.0, 9.0, 0.9, 0.0],    # IoU 0.9, most confident: matched up to threshold 0.9
        [50.0, 50.0, 60.0, 60.0, 0.8, 0.0],  # right box, wrong class -> FP
        [100.0, 100.0, 110.0, 110.0, 0.7, 1.0],  # no label there -> FP
        [0.0, 0.0, 10.0, 10.0, 0.5, 0.0],   # exact but less confident: a duplicate, except at 0.95
    ])
    correct = process_batch(dets, labels, IOUV)
    assert correct.shape == (4, 10) and correct.dtype == torch.bool
    assert correct[0].tolist() == [True] * 9 + [False]
    assert not correct[1:3].any()
    assert correct[3].tolist() == [False] * 9 + [True]
    assert process_batch(dets[:0], labels, IOUV).shape == (0, 10)
    assert not process_batch(dets, labels[:0], IOUV).any()


def adversarial_images(rng, n_images=60, nc=3):
    """Images built to hit every tie and corner of the matching: integer boxes on a 12-pixel canvas
    (many exactly equal IoUs, IoUs exactly on thresholds), clusters of duplicate detections around
    one label (identical boxes included), detections between two labels, several classes, scores
    drawn from a few values (equal scores), and images without labels, detections or both.
    Detections per image in NMS order (descending score). Returns [(labels (M, 5), dets (N, 6))]."""
    images = []
    for _ in range(n_images):
        n_labels = int(rng.choice([0, 1, 2, 3, 5]))
        labels = []
        for _ in range(n_labels):
            x1, y1 = rng.integers(0, 8, 2)
            w, h = rng.integers(2, 5, 2)
            labels.append([int(rng.integers(nc)), x1, y1, x1 + w, y1 + h])
        dets = []
        for lb in labels:
            for _ in range(int(rng.choice([0, 1, 3, 6]))):  # a cluster of duplicates around this label
                box = np.array(lb[1:], dtype=float)
                if rng.random() < 0.7:
                    box = box + rng.integers(-1, 2, 4)
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                cls = lb[0] if rng.random() < 0.85 else int(rng.integers(nc))
                dets.append([*box, rng.choice([0.3, 0.5, 0.5, 0.9]), cls])
        if len(labels) >= 2 and rng.random() < 0.5:  # a box spanning two labels
            a, b = labels[0], labels[1]
            dets.append([min(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), max(a[4], b[4]), 0.5, a[0]])
        for _ in range(int(rng.choice([0, 0, 2]))):  # false detections anywhere
            x1, y1 = rng.integers(0, 10, 2)
            dets.append([x1, y1, x1 + 2, y1 + 2, rng.choice([0.1, 0.5]), int(rng.integers(nc))])
        dets = torch.tensor(dets, dtype=torch.float32).view(-1, 6)
        dets = dets[torch.argsort(-dets[:, 4], stable=True)]
        images.append((torch.tensor(labels, dtype=torch.float32).view(-1, 5), dets))
    return images


@pytest.mark.parametrize("nc,seed", [(1, 0), (3, 1), (3, 2)])
def test_matching_and_ap_identical_to_peer(nc, seed):
    from tests.peer import peer_module

    peer_val, peer_metrics = peer_module("yolo9.val"), peer_module("yolo9.utils.metrics")
    images = adversarial_images(np.random.default_rng(seed), nc=nc)
    ours, theirs, n_differs_old = [], [], 0
    for labels, dets in images:
        correct = process_batch(dets, labels, IOUV)
        if len(dets) and len(labels):  # upstream's val.py calls it only then
            ref = peer_val.process_batch(dets, labels, IOUV)
            assert torch.equal(correct, ref), f"labels {labels.tolist()}\ndets {dets.tolist()}"
        else:
            ref = torch.zeros_like(correct)
            assert not correct.any()
        ours.append((correct, dets[:, 4], dets[:, 5], labels[:, 0]))
        theirs.append((ref, dets[:, 4], dets[:, 5], labels[:, 0]))
    ours = [torch.cat(x, 0).numpy() for x in zip(*ours)]
    theirs = [torch.cat(x, 0).numpy() for x in zip(*theirs)]
    assert ours[0].sum() > 50 and (~ours[0]).sum() > 50  # a real mix of true and false positives
    a, b = ap_per_class(*ours), peer_metrics.ap_per_class(*theirs, names={})
    for name, x, y in zip(("tp", "fp", "p", "r", "f1", "ap", "classes"), a, b):
        assert np.array_equal(x, y), f"{name}: {x} vs {y}"


# ---------------------------------------------------------------------------------------------
# AP: hand-computed cases
def test_perfect_detections_give_map_1():
    tp = np.ones((5, 10), dtype=bool)
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pred_cls = np.array([0, 0, 1, 1, 2])
    target_cls = np.array([0, 0, 1, 1, 2])
    for method, expected in (("coco", 1.0), ("continuous", 1.0), ("interp", 0.995)):
        tp_, fp_, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls, method=method)
        # upstream's rule reads the envelope as 0 at recall 1.0 (the (1, 0) sentinel), so a perfect
        # set scores 0.995 there, as in YOLOv5/YOLOv9; COCOeval's rule gives 1.0
        assert np.allclose(ap, expected) and classes.tolist() == [0, 1, 2]
        assert np.allclose(p, 1.0) and np.allclose(r, 1.0) and tp_.tolist() == [2, 2, 1] and fp_.sum() == 0


def test_one_of_two_objects_missed():
    # one detection, correct at every threshold; the second object is never detected: recall stops at 0.5
    tp, conf, pred_cls, target_cls = np.ones((1, 10), dtype=bool), np.array([0.9]), np.array([0]), np.array([0, 0])
    # upstream: envelope 1 up to recall 0.5, then linear to (1, 0): area 0.5 + 0.25
    ap = ap_per_class(tp, conf, pred_cls, target_cls)[5]
    assert np.allclose(ap, 0.75)
    # COCOeval: precision 1 at the 51 recall thresholds 0.00..0.50, 0 at the other 50
    ap = ap_per_class(tp, conf, pred_cls, target_cls, method="coco")[5]
    assert np.allclose(ap, 51 / 101)
    assert np.allclose(ap_per_class(tp, conf, pred_cls, target_cls, method="continuous")[5], 0.5)


def test_compute_ap_coco_rule_by_hand():
    # detections: TP, FP, TP with 2 labels -> recall [.5, .5, 1], precision [1, .5, 2/3]
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    ap, _, _ = compute_ap(recall, precision, method="coco")
    assert ap == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert compute_ap(recall, precision, method="continuous")[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    with pytest.raises(ValueError):
        compute_ap(recall, precision, method="nope")


def test_fitness_weights():
    assert fitness(np.array([[0.3, 0.4, 0.5, 0.2]])).tolist() == pytest.approx([0.1 * 0.5 + 0.9 * 0.2])


def test_confusion_matrix():
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0], [1.0, 50.0, 50.0, 60.0, 60.0]])
    dets = torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0], [50.0, 50.0, 60.0, 60.0, 0.9, 0.0],
                         [80.0, 80.0, 90.0, 90.0, 0.9, 1.0], [0.0, 0.0, 10.0, 10.0, 0.1, 1.0]])
    cm.process_batch(dets, labels)
    cm.process_batch(None, torch.tensor([1.0]))
    # rows predicted, columns true (last = background)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------
# AP against pycocotools
def random_scene(rng, n_images=40, nc=1, size=320, cells=4):
    """Random labels and detections, built so that upstream's matching (highest IoU wins) and
    COCOeval's (highest score wins) pick the same pairs: objects sit in separate grid cells, and a
    duplicate detection of an object always has both a lower IoU and a lower score than the main one.
    Returns per image (labels (M, 5) [cls, xyxy], detections (N, 6) [xyxy, conf, cls]), all on a
    1/8-pixel grid, scores distinct."""
    cell = size / cells
    scores = iter(rng.permutation(np.arange(100, 10000)) / 10000)  # distinct, exact in JSON
    images = []

    def grid(x):
        return np.round(np.asarray(x) * 8) / 8

    def jitter(box, sigma, lo, hi):
        w, h = box[2] - box[0], box[3] - box[1]
        out = grid(np.clip(box + rng.normal(0, sigma, 4) * [w, h, w, h], lo, hi))
        return out if out[2] - out[0] >= 2 and out[3] - out[1] >= 2 else box.copy()

    def iou(a, b):
        return box_iou(torch.tensor(a[None]), torch.tensor(b[None])).item()

    for _ in range(n_images):
        labels, dets = [], []
        for cy in range(cells):
            for cx in range(cells):
                lo = np.array([cx * cell, cy * cell] * 2)
                hi = lo + cell
                u = rng.random()
                if u < 0.45:  # an object
                    c = int(rng.integers(nc))
                    w, h = rng.uniform(0.25, 0.8, 2) * cell
                    x1, y1 = lo[:2] + rng.uniform(0, 1, 2) * (cell - np.array([w, h]))
                    gt = grid([x1, y1, x1 + w, y1 + h])
                    labels.append([c, *gt])
                    if rng.random() < 0.85:  # detected (IoU spread over 0.4..1)
                        main = jitter(gt, rng.uniform(0.0, 0.12), lo, hi)
                        cls = c if rng.random() > 0.08 or nc == 1 else (c + 1) % nc
                        s = next(scores)
                        dets.append([*main, s, cls])
                        if rng.random() < 0.3:  # a duplicate: lower IoU and lower score
                            dup = jitter(gt, 0.25, lo, hi)
                            if iou(dup, gt) < iou(main, gt):
                                s2 = next(scores)
                                while s2 >= s:
                                    s2 = next(scores)
                                dets.append([*dup, s2, cls])
                elif u < 0.6:  # a false detection in an empty cell
                    w, h = rng.uniform(0.2, 0.8, 2) * cell
                    x1, y1 = lo[:2] + rng.uniform(0, 1, 2) * (cell - np.array([w, h]))
                    dets.append([*grid([x1, y1, x1 + w, y1 + h]), next(scores) * 0.8, int(rng.integers(nc))])
        images.append((torch.tensor(labels, dtype=torch.float64).view(-1, 5),
                       torch.tensor(dets, dtype=torch.float64).view(-1, 6)))
    return images


def our_map(images, method):
    stats = []
    for labels, dets in images:
        stats.append((process_batch(dets, labels, IOUV), dets[:, 4], dets[:, 5], labels[:, 0]))
    stats = [torch.cat(x, 0).numpy() for x in zip(*stats)]
    ap = ap_per_class(*stats, method=method)[5]
    return ap[:, 0].mean(), ap.mean()


def coco_map(images, nc):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [{"id": i, "width": 320, "height": 320} for i in range(len(images))],
          "categories": [{"id": c, "name": str(c)} for c in range(nc)], "annotations": []}
    res = []
    for i, (labels, dets) in enumerate(images):
        for c, x1, y1, x2, y2 in labels.tolist():
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(c),
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                      "iscrowd": 0})
        for x1, y1, x2, y2, s, c in dets.tolist():
            res.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        anno = COCO()
        anno.dataset = gt
        anno.createIndex()
        ev = COCOeval(anno, anno.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert max(len(d) for _, d in images) < ev.params.maxDets[-1]  # max dets not binding
    return ev.stats[1], ev.stats[0]


@pytest.mark.parametrize("nc,seed", [(1, 0), (1, 1), (3, 2)])
def test_map_agrees_with_pycocotools(nc, seed):
    images = random_scene(np.random.default_rng(seed), nc=nc)
    n_gt = sum(len(lb) for lb, _ in images)
    assert n_gt > 100
    ours50, ours = our_map(images, method="coco")
    ref50, ref = coco_map(images, nc)
    assert 0.2 < ref < 0.9  # a non-trivial case
    assert ours50 == pytest.approx(ref50, abs=1e-3)
    assert ours == pytest.approx(ref, abs=1e-3)
