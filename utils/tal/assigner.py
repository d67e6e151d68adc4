"""Task-aligned label assignment (TOOD / PP-YOLOE / YOLOv9 style).

For every ground-truth box the assigner picks the anchors that are both inside the box and rank
among the ``topk`` best by the alignment metric ``score**alpha * iou**beta`` (score: the predicted
probability of the gt's class at that anchor, iou: CIoU of the anchor's predicted box with the gt,
clamped at 0). An anchor chosen by several gts keeps the one it overlaps most. The class targets of
the positive anchors are soft: one-hot times the alignment metric normalised per gt so that the
gt's best anchor gets that gt's best IoU.
"""
import math

import torch
import torch.nn as nn


def _ciou_xyxy(box1, box2, eps=1e-7):
    """Complete IoU of broadcastable xyxy boxes ``(..., 4)`` -> ``(..., 1)``."""
    b1_x1, b1_y1, b1_x2, b1_y2 = box1.chunk(4, -1)
    b2_x1, b2_y1, b2_x2, b2_y2 = box2.chunk(4, -1)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)  # enclosing box
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2).pow(2) + (b2_y1 + b2_y2 - b1_y1 - b1_y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def anchors_in_boxes(anc_points, gt_bboxes, eps=1e-9):
    """Mask ``(b, n, a)``: anchor centre ``(a, 2)`` strictly inside xyxy gt box ``(b, n, 4)``."""
    lt, rb = gt_bboxes.unsqueeze(2).chunk(2, -1)  # (b, n, 1, 2) each
    deltas = torch.cat((anc_points - lt, rb - anc_points), -1)  # (b, n, a, 4)
    return deltas.amin(-1) > eps


class TaskAlignedAssigner(nn.Module):
    """Assign ground truths to anchors. Stateless; runs without gradients.

    ``forward(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt)``:
        pd_scores  (b, a, nc)  predicted class probabilities (after sigmoid)
        pd_bboxes  (b, a, 4)   predicted boxes, xyxy, same units as the gts (pixels)
        anc_points (a, 2)      anchor centres, same units
        gt_labels  (b, n, 1)   gt classes (padding rows: anything, masked by mask_gt)
        gt_bboxes  (b, n, 4)   gt boxes, xyxy
        mask_gt    (b, n, 1)   1 for real gts, 0 for padding
    returns ``(target_labels (b, a) long, target_bboxes (b, a, 4), target_scores (b, a, nc),
    fg_mask (b, a) bool)``; background anchors get label ``num_classes``, a zero box and zero scores.
    """

    def __init__(self, topk=10, num_classes=80, alpha=0.5, beta=6.0, eps=1e-9):
        super().__init__()
        self.topk = topk
        self.num_classes = num_classes
        self.bg_idx = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt):
        bs, n_anchors, nc = pd_scores.shape
        n_max = gt_bboxes.shape[1]
        device = pd_scores.device
        if n_max == 0:
            return (
                torch.full((bs, n_anchors), self.bg_idx, dtype=torch.long, device=device),
                torch.zeros((bs, n_anchors, 4), dtype=gt_bboxes.dtype, device=device),
                torch.zeros((bs, n_anchors, nc), dtype=pd_scores.dtype, device=device),
                torch.zeros((bs, n_anchors), dtype=torch.bool, device=device),
            )

        labels = gt_labels.view(bs, n_max).long().clamp(0, nc - 1)
        valid = mask_gt.view(bs, n_max, 1).bool()
        gt_f, pd_f = gt_bboxes.float(), pd_bboxes.float()

        # alignment metric and overlaps, (b, n, a)
        idx = labels.unsqueeze(-1).expand(bs, n_max, n_anchors)
        cls_scores = pd_scores.float().transpose(1, 2).gather(1, idx)  # score of the gt's class
        overlaps = _ciou_xyxy(gt_f.unsqueeze(2), pd_f.unsqueeze(1)).squeeze(-1).clamp(0)
        align = cls_scores.pow(self.alpha) * overlaps.pow(self.beta)

        # candidates: inside the gt and among its top-k by metric
        in_gts = anchors_in_boxes(anc_points.float(), gt_f) & valid
        k = min(self.topk, n_anchors)
        # outside anchors rank below every candidate (metric >= 0), so they never take a top-k slot
        topk_idx = align.masked_fill(~in_gts, -1.0).topk(k, dim=-1).indices  # (b, n, k), unique per gt
        in_topk = torch.zeros_like(in_gts).scatter_(-1, topk_idx, True)
        mask_pos = in_topk & in_gts  # (b, n, a)

        # an anchor claimed by several gts keeps the one with the highest overlap
        multi = mask_pos.sum(1, keepdim=True) > 1  # (b, 1, a)
        if multi.any():
            best = (overlaps * mask_pos).argmax(1, keepdim=True)  # (b, 1, a)
            is_best = torch.zeros_like(mask_pos).scatter_(1, best, True)
            mask_pos = torch.where(multi, is_best & mask_pos, mask_pos)
        fg_mask = mask_pos.any(1)  # (b, a)
        gt_idx = mask_pos.float().argmax(1)  # (b, a), the gt each anchor serves

        # targets
        target_labels = labels.gather(1, gt_idx)
        target_bboxes = gt_bboxes.gather(1, gt_idx.unsqueeze(-1).expand(bs, n_anchors, 4))
        target_bboxes = target_bboxes * fg_mask.unsqueeze(-1)
        onehot = torch.zeros((bs, n_anchors, nc), dtype=torch.float32, device=device)
        onehot.scatter_(-1, target_labels.unsqueeze(-1), 1.0)
        onehot = onehot * fg_mask.unsqueeze(-1)
        target_labels = torch.where(fg_mask, target_labels, torch.full_like(target_labels, self.bg_idx))

        # normalise: per gt, the best-aligned anchor gets that gt's best IoU
        align = align * mask_pos
        max_align = align.amax(-1, keepdim=True)  # (b, n, 1)
        max_iou = (overlaps * mask_pos).amax(-1, keepdim=True)  # (b, n, 1)
        norm = (align * max_iou / (max_align + self.eps)).amax(1)  # (b, a)
        target_scores = (onehot * norm.unsqueeze(-1)).to(pd_scores.dtype)
        return target_labels, target_bboxes, target_scores, fg_mask
