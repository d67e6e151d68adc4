"""Detection metrics: IoU variants, matching of detections to labels, AP per class, fitness.

AP is computed the upstream (YOLOv5/YOLOv9) way by default: the precision envelope sampled at 101
recall points by linear interpolation and integrated with the trapezoid rule. `method='coco'` gives
COCOeval's rule instead (envelope value at the first recall >= each of the 101 recall thresholds,
averaged), which with the same matching reproduces pycocotools' numbers.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torchvision

AP_METHODS = ("interp", "coco", "continuous")


def fitness(x):
    """Model fitness: weighted sum of [P, R, mAP50, mAP50-95] (rows of `x`)."""
    w = np.array([0.0, 0.0, 0.1, 0.9])
    return (np.asarray(x)[:, :4] * w).sum(1)


def box_iou(box1, box2):
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    return torchvision.ops.box_iou(box1, box2)


def bbox_iou(box1, box2, xywh=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-7):
    """Elementwise (broadcasting) IoU of boxes on the last axis; returns shape (..., 1).

    xywh: boxes are [cx, cy, w, h] (else [x1, y1, x2, y2]). GIoU / DIoU / CIoU select the
    generalized, distance or complete IoU (CIoU's alpha is taken without gradient)."""
    if xywh:
        (cx1, cy1, w1, h1), (cx2, cy2, w2, h2) = box1.chunk(4, -1), box2.chunk(4, -1)
        ax1, ax2, ay1, ay2 = cx1 - w1 / 2, cx1 + w1 / 2, cy1 - h1 / 2, cy1 + h1 / 2
        bx1, bx2, by1, by2 = cx2 - w2 / 2, cx2 + w2 / 2, cy2 - h2 / 2, cy2 + h2 / 2
    else:
        ax1, ay1, ax2, ay2 = box1.chunk(4, -1)
        bx1, by1, bx2, by2 = box2.chunk(4, -1)
        w1, h1 = ax2 - ax1, ay2 - ay1
        w2, h2 = bx2 - bx1, by2 - by1
    h1, h2 = h1 + eps, h2 + eps

    inter = (torch.min(ax2, bx2) - torch.max(ax1, bx1)).clamp(0) * (torch.min(ay2, by2) - torch.max(ay1, by1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    cw = torch.max(ax2, bx2) - torch.min(ax1, bx1)  # enclosing box
    ch = torch.max(ay2, by2) - torch.min(ay1, by1)
    if GIoU and not (DIoU or CIoU):
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    c2 = cw ** 2 + ch ** 2 + eps  # enclosing diagonal squared
    rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4  # centre distance squared
    if DIoU and not CIoU:
        return iou - rho2 / c2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)  # aspect-ratio term
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _pairwise_iou_upstream(box1, box2, eps=1e-7):
    """Pairwise IoU (N, M) as upstream's matching computes it: in the boxes' own dtype and with
    `eps` added to the union. Not torchvision's box_iou: the eps moves IoUs that sit exactly on a
    threshold (e.g. 0.5) below it, and the matching must agree with upstream on those too."""
    lt = torch.max(box1[:, None, :2], box2[None, :, :2])
    rb = torch.min(box1[:, None, 2:], box2[None, :, 2:])
    inter = (rb - lt).clamp(0).prod(2)
    area1 = (box1[:, 2] - box1[:, 0]) * (box1[:, 3] - box1[:, 1])
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1])
    return inter / (area1[:, None] + area2 - inter + eps)


def process_batch(detections, labels, iouv):
    """Which detections are true positives at each IoU threshold: upstream YOLOv9's matching.

    detections (N, 6) [x1, y1, x2, y2, conf, cls], in the order NMS returns them (descending
    confidence); labels (M, 5) [cls, x1, y1, x2, y2]; iouv (T,). At each threshold, among the
    same-class pairs with IoU >= threshold, every detection first keeps its highest-IoU label, then
    every label keeps the first of its detections in detection order (the most confident one, as
    COCOeval's greedy-by-score matching), not its highest-IoU one: a label's low-confidence duplicate
    must not win over the confident box. Ties are broken as upstream does (same numpy sort).
    Returns a bool tensor (N, T)."""
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if detections.shape[0] and labels.shape[0]:
        iou = _pairwise_iou_upstream(labels[:, 1:5], detections[:, :4])  # (M, N)
        same_class = labels[:, 0:1] == detections[:, 5]
        for k in range(len(iouv)):
            li, di = torch.where((iou >= iouv[k]) & same_class)
            if not li.shape[0]:
                continue
            matches = torch.stack((li.to(iou.dtype), di.to(iou.dtype), iou[li, di]), 1).cpu().numpy()
            if len(matches) > 1:
                # numpy's default argsort, reversed: the order in which upstream breaks equal IoUs
                matches = matches[matches[:, 2].argsort()[::-1]]
                matches = matches[np.unique(matches[:, 1], return_index=True)[1]]  # best label per detection
                # now in detection order: the first (most confident) detection of each label wins
                matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
            correct[matches[:, 1].astype(int), k] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


def compute_ap(recall, precision, method="interp"):
    """AP of one recall/precision curve (detections sorted by decreasing confidence).

    method 'interp' (upstream default): 101-point linear interpolation of the precision envelope,
    trapezoid rule. 'coco': COCOeval's rule. 'continuous': exact area under the envelope.
    Returns (ap, mpre, mrec) with the sentinel-padded envelope curve."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # precision envelope
    if method == "interp":
        x = np.linspace(0, 1, 101)
        ap = np.trapezoid(np.interp(x, mrec, mpre), x)
    elif method == "coco":
        envelope = np.flip(np.maximum.accumulate(np.flip(precision))) if len(precision) else precision
        idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
        q = np.zeros(101)
        q[idx < len(recall)] = envelope[idx[idx < len(recall)]]
        ap = q.mean()
    elif method == "continuous":
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    else:
        raise ValueError(f"AP method {method!r} is not one of {AP_METHODS}")
    return float(ap), mpre, mrec


def smooth(y, f=0.05):
    """Box filter over a fraction f of the points (odd width, edge-padded)."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    yp = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


def ap_per_class(tp, conf, pred_cls, target_cls, plot=False, save_dir=".", names=(), eps=1e-16, prefix="",
                 method="interp"):
    """AP per class and IoU threshold, plus P, R, F1 at the confidence of best mean F1.

    tp (N, T) bool, conf (N,), pred_cls (N,), target_cls (M,): numpy arrays over the whole set.
    Returns tp, fp, p, r, f1 (per class), ap (classes, T), unique_classes (the classes with labels)."""
    tp = np.asarray(tp, dtype=np.float64)
    tp = tp[:, None] if tp.ndim == 1 else tp
    conf, pred_cls, target_cls = np.asarray(conf), np.asarray(pred_cls), np.asarray(target_cls)
    order = np.argsort(-conf)  # numpy's default sort, as upstream: equal scores keep upstream's order
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    unique_classes, nt = np.unique(target_cls, return_counts=True)
    nc = unique_classes.shape[0]
    px, py = np.linspace(0, 1, 1000), []  # x axis of the P, R, F1 curves (confidence)
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        n_l, n_p = nt[ci], i.sum()
        if n_p == 0 or n_l == 0:
            continue
        fpc = (1 - tp[i]).cumsum(0)
        tpc = tp[i].cumsum(0)
        recall = tpc / (n_l + eps)
        precision = tpc / (tpc + fpc)
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)  # recall at confidence px
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j], method=method)
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))

    f1 = 2 * p * r / (p + r + eps)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    names = {i: names[int(c)] if int(c) < len(names) else str(int(c)) for i, c in enumerate(unique_classes)}
    if plot and nc:
        _plot_pr_curve(px, py, ap, Path(save_dir) / f"{prefix}PR_curve.png", names)
        for y, name, label in ((f1, "F1", "F1"), (p, "P", "Precision"), (r, "R", "Recall")):
            _plot_mc_curve(px, y, Path(save_dir) / f"{prefix}{name}_curve.png", names, ylabel=label)

    i = smooth(f1.mean(0), 0.1).argmax() if nc else 0  # best mean-F1 confidence
    p, r, f1 = p[:, i], r[:, i], f1[:, i]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


class ConfusionMatrix:
    """(nc+1) x (nc+1) counts: rows predicted class, columns true class, last row/column background."""

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres

    def process_batch(self, detections, labels):
        """detections (N, 6) [x1, y1, x2, y2, conf, cls] or None; labels (M, 5) [cls, x1, y1, x2, y2]
        (or the (M,) classes when detections is None)."""
        if detections is None:
            for gc in labels.int().tolist():
                self.matrix[self.nc, gc] += 1
            return
        detections = detections[detections[:, 4] > self.conf]
        gt_classes, det_classes = labels[:, 0].int().tolist(), detections[:, 5].int().tolist()
        matches = np.zeros((0, 3))
        if len(gt_classes) and len(det_classes):
            iou = box_iou(labels[:, 1:5].float(), detections[:, :4].float()).cpu().numpy()
            li, di = np.nonzero(iou > self.iou_thres)
            if len(li):
                matches = np.stack((li, di, iou[li, di]), 1)
                matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
                matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
                matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
                matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
        m_label, m_det = matches[:, 0].astype(int), matches[:, 1].astype(int)
        for i, gc in enumerate(gt_classes):
            j = np.nonzero(m_label == i)[0]
            if len(j) == 1:
                self.matrix[det_classes[m_det[j[0]]], gc] += 1
            else:
                self.matrix[self.nc, gc] += 1  # missed: background
        for i, dc in enumerate(det_classes):
            if not (m_det == i).any():
                self.matrix[dc, self.nc] += 1  # false detection

    def tp_fp(self):
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, save_dir="", names=(), normalize=True):
        array = self.matrix / ((self.matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
        fig, ax = _figure((9, 7))
        im = ax.imshow(array, cmap="Blues", vmin=0.0)
        fig.colorbar(im, ax=ax)
        if 0 < len(names) == self.nc < 30:
            ticks = list(names) + ["background"]
            ax.set_xticks(range(self.nc + 1), ticks, rotation=90)
            ax.set_yticks(range(self.nc + 1), ticks)
        ax.set_xlabel("True")
        ax.set_ylabel("Predicted")
        ax.set_title("Confusion Matrix")
        fig.savefig(Path(save_dir) / "confusion_matrix.png", dpi=150)


def _figure(size):
    """A matplotlib Figure with one Axes, without pyplot (no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, tight_layout=True)
    return fig, fig.add_subplot(1, 1, 1)


def _plot_pr_curve(px, py, ap, save_path, names):
    fig, ax = _figure((9, 6))
    py = np.stack(py, 1) if py else np.zeros((len(px), 0))
    for i, y in enumerate(py.T):
        if 0 < len(names) < 21:
            ax.plot(px, y, linewidth=1, label=f"{names[i]} {ap[i, 0]:.3f}")
        else:
            ax.plot(px, y, linewidth=1, color="grey")
    if py.shape[1]:
        ax.plot(px, py.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall Curve")
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(save_path, dpi=150)


def _plot_mc_curve(px, py, save_path, names, xlabel="Confidence", ylabel="Metric"):
    fig, ax = _figure((9, 6))
    for i, y in enumerate(py):
        if 0 < len(names) < 21:
            ax.plot(px, y, linewidth=1, label=f"{names[i]}")
        else:
            ax.plot(px, y, linewidth=1, color="grey")
    y = smooth(py.mean(0), 0.05)
    ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-Confidence Curve")
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(save_path, dpi=150)
