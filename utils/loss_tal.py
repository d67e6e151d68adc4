"""YOLOv9 detection loss for the anchor-free DDetect / DualDDetect heads.

Per head: task-aligned assignment, BCE class loss on soft targets, CIoU box loss and distribution
focal loss (DFL) on the positive anchors, both weighted by the anchor's target score and divided by
the sum of target scores. A dual head (``[d1, d2]``: auxiliary, main) adds ``0.25 * aux + main`` per
component, as upstream's loss_tal_dual. Components are scaled by ``hyp['box']``, ``hyp['cls']`` and
``hyp['dfl']``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.tal.anchor_generator import bbox2dist, dist2bbox, make_anchors
from utils.tal.assigner import TaskAlignedAssigner, _ciou_xyxy

AUX_WEIGHT = 0.25  # weight of every auxiliary head (all but the last), upstream loss_tal_dual


def _is_level_list(x):
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(torch.is_tensor(t) and t.dim() == 4 for t in x)


def split_heads(preds):
    """Model output -> list of heads, each a list of ``(B, no, H, W)`` maps; the main head is last.

    Accepts the train-mode output (DDetect list, DualDDetect ``[d1, d2]``) and the eval-mode tuple
    ``(y, x)`` (its ``x`` part is used).
    """
    if _is_level_list(preds):
        return [list(preds)]
    if isinstance(preds, (list, tuple)) and len(preds) > 0 and all(_is_level_list(h) for h in preds):
        return [list(h) for h in preds]
    if isinstance(preds, tuple) and len(preds) == 2:  # eval output (inference, train-style)
        return split_heads(preds[1])
    raise ValueError("ComputeLoss: expected a list of (B, no, H, W) maps or a list of such lists")


def _xywh2xyxy(x):
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


class ComputeLoss:
    """``loss, loss_items = ComputeLoss(model)(preds, targets)``.

    ``targets``: ``(n, 6)`` ``[img_idx, cls, cx, cy, w, h]``, boxes normalised to the input image.
    ``loss``: scalar, ``sum([box, cls, dfl]) * batch_size``; ``loss_items``: detached ``[box, cls, dfl]``.
    """

    def __init__(self, model, use_dfl=True):
        model = model.module if hasattr(model, "module") else model  # DP / DDP
        device = next(model.parameters()).device
        h = model.hyp
        m = model.model[-1]  # DDetect / DualDDetect
        self.hyp = h
        self.device = device
        self.nc = m.nc
        self.no = m.no
        self.reg_max = m.reg_max
        self.stride = torch.as_tensor(m.stride, dtype=torch.float32).cpu()
        self.use_dfl = use_dfl
        self.bce = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([h.get("cls_pw", 1.0)], device=device), reduction="none"
        )
        self.assigner = TaskAlignedAssigner(topk=10, num_classes=self.nc, alpha=0.5, beta=6.0)
        self.proj = torch.arange(self.reg_max, dtype=torch.float32, device=device)

    # -- targets --------------------------------------------------------------------------------
    def preprocess(self, targets, batch_size, scale_tensor):
        """``(n, 6)`` normalised targets -> ``(B, n_max, 5)`` ``[cls, x1, y1, x2, y2]`` in pixels and
        a ``(B, n_max, 1)`` mask of the real rows."""
        targets = targets.to(self.device, torch.float32)
        if targets.shape[0] == 0:
            return torch.zeros(batch_size, 0, 5, device=self.device), torch.zeros(
                batch_size, 0, 1, dtype=torch.bool, device=self.device
            )
        img = targets[:, 0].long()
        counts = torch.bincount(img, minlength=batch_size)
        n_max = int(counts.max())
        order = torch.argsort(img, stable=True)
        img_sorted = img[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(img), device=self.device) - starts[img_sorted]
        out = torch.zeros(batch_size, n_max, 5, device=self.device)
        out[img_sorted, slot] = targets[order, 1:6]
        out[..., 1:5] = _xywh2xyxy(out[..., 1:5] * scale_tensor)
        mask = (torch.arange(n_max, device=self.device) < counts[:, None]).unsqueeze(-1)
        return out, mask

    def bbox_decode(self, anchor_points, pred_dist):
        """``(B, A, 4*reg_max)`` logits -> ``(B, A, 4)`` xyxy boxes in grid units."""
        if self.use_dfl:
            b, a, c = pred_dist.shape
            pred_dist = pred_dist.view(b, a, 4, c // 4).softmax(3).matmul(self.proj.to(pred_dist.dtype))
        return dist2bbox(pred_dist, anchor_points, xywh=False)

    # -- per head -------------------------------------------------------------------------------
    def _dfl(self, pred_dist, target):
        """Distribution focal loss; ``pred_dist (n, 4, reg_max)`` logits, ``target (n, 4)`` in
        ``[0, reg_max - 1)`` -> ``(n, 1)``."""
        left = target.long()
        right = left + 1
        w_left = right.float() - target
        w_right = 1.0 - w_left
        logits = pred_dist.reshape(-1, self.reg_max)
        ce_l = F.cross_entropy(logits, left.view(-1), reduction="none").view(left.shape)
        ce_r = F.cross_entropy(logits, right.view(-1), reduction="none").view(left.shape)
        return (ce_l * w_left + ce_r * w_right).mean(-1, keepdim=True)

    def _head_loss(self, feats, gt_labels, gt_bboxes, mask_gt):
        """Unweighted ``[box, cls, dfl]`` of one head."""
        b = feats[0].shape[0]
        pred = torch.cat([f.reshape(b, self.no, -1) for f in feats], 2).float()
        pred_distri, pred_scores = pred.split((self.no - self.nc, self.nc), 1)
        pred_distri = pred_distri.permute(0, 2, 1).contiguous()  # (B, A, 4*reg_max)
        pred_scores = pred_scores.permute(0, 2, 1).contiguous()  # (B, A, nc)

        anchor_points, stride_tensor = make_anchors(feats, self.stride, 0.5)
        anchor_points, stride_tensor = anchor_points.float(), stride_tensor.float()
        pred_bboxes = self.bbox_decode(anchor_points, pred_distri)  # grid units

        _, target_bboxes, target_scores, fg_mask = self.assigner(
            pred_scores.detach().sigmoid(),
            pred_bboxes.detach() * stride_tensor,
            anchor_points * stride_tensor,
            gt_labels,
            gt_bboxes,
            mask_gt,
        )
        target_bboxes = target_bboxes / stride_tensor
        target_scores_sum = target_scores.sum().clamp(min=1.0)

        loss_cls = self.bce(pred_scores, target_scores).sum() / target_scores_sum

        if fg_mask.any():
            weight = target_scores.sum(-1)[fg_mask].unsqueeze(-1)  # (n_fg, 1)
            iou = _ciou_xyxy(pred_bboxes[fg_mask], target_bboxes[fg_mask])
            loss_box = ((1.0 - iou) * weight).sum() / target_scores_sum
            if self.use_dfl:
                target_ltrb = bbox2dist(anchor_points, target_bboxes, self.reg_max - 1)[fg_mask]
                pd = pred_distri[fg_mask].view(-1, 4, self.reg_max)
                loss_dfl = (self._dfl(pd, target_ltrb) * weight).sum() / target_scores_sum
            else:
                loss_dfl = pred_distri.sum() * 0.0
        else:  # no positives: zero, but keep the box branch in the graph (DDP, finite grads)
            loss_box = pred_distri.sum() * 0.0
            loss_dfl = pred_distri.sum() * 0.0
        return torch.stack((loss_box, loss_cls, loss_dfl))

    # -- entry point ----------------------------------------------------------------------------
    def __call__(self, preds, targets, img=None, epoch=0):
        heads = split_heads(preds)
        feats = heads[-1]
        batch_size = feats[0].shape[0]
        imgsz = torch.tensor(feats[0].shape[2:], device=self.device, dtype=torch.float32) * float(self.stride[0])
        gts, mask_gt = self.preprocess(targets, batch_size, imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = gts.split((1, 4), 2)

        loss = torch.zeros(3, device=self.device)
        for i, head in enumerate(heads):
            w = 1.0 if i == len(heads) - 1 else AUX_WEIGHT
            loss = loss + w * self._head_loss(head, gt_labels, gt_bboxes, mask_gt)

        gains = torch.tensor(
            [self.hyp["box"], self.hyp["cls"], self.hyp["dfl"]], dtype=torch.float32, device=self.device
        )
        loss = loss * gains
        return loss.sum() * batch_size, loss.detach()
