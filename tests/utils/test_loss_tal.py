"""Tests for utils.tal.assigner.TaskAlignedAssigner and utils.loss_tal.ComputeLoss."""
import math

import pytest
import torch
import torch.nn as nn

from utils.loss_tal import ComputeLoss
from utils.tal.anchor_generator import make_anchors
from utils.tal.assigner import TaskAlignedAssigner

HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
NC, REG_MAX, IMG = 3, 16, 64
STRIDES = (8, 16, 32)


# ---------------------------------------------------------------------------------------------
# stand-in model: the attributes ComputeLoss reads, train-mode outputs of DDetect / DualDDetect
class _Head(nn.Module):
    def __init__(self, nc=NC, reg_max=REG_MAX, dual=False):
        super().__init__()
        self.nc, self.reg_max, self.nl = nc, reg_max, 3
        self.no = nc + 4 * reg_max
        self.stride = torch.tensor([float(s) for s in STRIDES])
        self.dual = dual
        n_heads = 2 if dual else 1
        self.convs = nn.ModuleList(nn.Conv2d(16, self.no, 1) for _ in range(3 * n_heads))

    def forward(self, feats):
        outs = [conv(feats[i % 3]) for i, conv in enumerate(self.convs)]
        return [outs[:3], outs[3:]] if self.dual else outs


class _TinyModel(nn.Module):
    def __init__(self, dual=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.SiLU())
        self.model = nn.Sequential(_Head(dual=dual))
        self.hyp = dict(HYP)

    def forward(self, x):
        x = self.stem(x)
        feats = [nn.functional.avg_pool2d(x, s) for s in STRIDES]
        return self.model[-1](feats)


def _targets():
    # [img_idx, cls, cx, cy, w, h] normalised; image 1 has two boxes, image 0 one
    return torch.tensor(
        [
            [0, 1, 0.40, 0.40, 0.50, 0.50],
            [1, 0, 0.30, 0.30, 0.30, 0.40],
            [1, 2, 0.70, 0.70, 0.40, 0.30],
        ]
    )


def _random_preds(b=2, seed=0, dual=False):
    g = torch.Generator().manual_seed(seed)
    no = NC + 4 * REG_MAX

    def head():
        return [torch.randn(b, no, IMG // s, IMG // s, generator=g) for s in STRIDES]

    return [head(), head()] if dual else head()


def _perfect_preds(targets, b=2):
    """Logits whose decoded boxes equal the gt at anchors inside it, with the right class."""
    feats = [torch.zeros(b, NC + 4 * REG_MAX, IMG // s, IMG // s) for s in STRIDES]
    anchors, strides = make_anchors(feats, STRIDES, 0.5)
    n_anc = anchors.shape[0]
    dist = torch.zeros(b, n_anc, 4, REG_MAX)
    dist[..., 0] = 5.0  # background anchors: short distances
    cls = torch.full((b, n_anc, NC), -10.0)
    for img, c, cx, cy, w, h in targets.tolist():
        box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * IMG
        pix = anchors * strides
        inside = (pix > box[:2]).all(1) & (pix < box[2:]).all(1)
        ltrb = torch.cat((pix - box[:2], box[2:] - pix), 1) / strides  # grid units
        ltrb = ltrb.clamp(0, REG_MAX - 1 - 0.01)
        left = ltrb.floor().long()
        wr = ltrb - left
        onehot = torch.full((n_anc, 4, REG_MAX), 1e-9)
        onehot.scatter_(-1, left.unsqueeze(-1), (1 - wr).unsqueeze(-1))
        onehot.scatter_add_(-1, (left + 1).unsqueeze(-1), wr.unsqueeze(-1))
        dist[int(img), inside] = onehot[inside].clamp(min=1e-9).log()
        cls[int(img), inside] = -10.0
        cls[int(img), inside, int(c)] = 10.0
    pred = torch.cat((dist.view(b, n_anc, -1), cls), -1).permute(0, 2, 1)  # (b, no, A)
    out, i = [], 0
    for f in feats:
        n = f.shape[2] * f.shape[3]
        out.append(pred[:, :, i : i + n].reshape(f.shape).contiguous())
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# assigner
def _grid_anchors():
    ys, xs = torch.meshgrid(torch.arange(8) * 8.0 + 4, torch.arange(8) * 8.0 + 4, indexing="ij")
    return torch.stack((xs, ys), -1).view(-1, 2)  # (64, 2) pixel centres, stride 8


def test_assigner_fg_is_anchors_inside_gt():
    anc = _grid_anchors()
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])
    pd_bboxes = gt.expand(1, 64, 4).clone()  # every prediction is the gt box -> IoU 1
    pd_scores = torch.full((1, 64, NC), 0.5)
    labels = torch.tensor([[[1.0]]])
    mask = torch.ones(1, 1, 1)
    a = TaskAlignedAssigner(topk=20, num_classes=NC)
    tl, tb, ts, fg = a(pd_scores, pd_bboxes, anc, labels, gt, mask)
    inside = ((anc > 8) & (anc < 40)).all(1)  # centres 12, 20, 28, 36 -> 16 anchors
    assert inside.sum() == 16
    assert torch.equal(fg[0], inside)
    assert (tl[0][inside] == 1).all() and (tl[0][~inside] == NC).all()
    assert torch.allclose(tb[0][inside], gt[0].expand(16, 4))
    assert torch.allclose(ts[0][inside, 1], torch.ones(16), atol=1e-4)
    assert ts[0][inside][:, [0, 2]].abs().max() == 0 and ts[0][~inside].abs().max() == 0


def test_assigner_topk_picks_best_aligned_inside_only():
    anc = _grid_anchors()
    gt = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]])
    pd_bboxes = gt.expand(1, 64, 4).clone()
    pd_scores = torch.full((1, 64, NC), 0.1)
    inside = torch.nonzero(((anc > 8) & (anc < 40)).all(1)).flatten()
    best = inside[[0, 5, 10, 15]]
    pd_scores[0, best, 2] = 0.9
    pd_scores[0, 0, 2] = 1.0  # outside the gt: best score, must not be chosen
    a = TaskAlignedAssigner(topk=4, num_classes=NC)
    tl, _, ts, fg = a(pd_scores, pd_bboxes, anc, torch.tensor([[[2.0]]]), gt, torch.ones(1, 1, 1))
    assert sorted(torch.nonzero(fg[0]).flatten().tolist()) == sorted(best.tolist())
    # normalised scores: best anchor of the gt gets the gt's best IoU (1 here)
    assert torch.allclose(ts[0, best, 2], torch.ones(4), atol=1e-4)


def test_assigner_resolves_shared_anchor_by_iou_and_ignores_padding():
    anc = _grid_anchors()
    box_a, box_b = [8.0, 8.0, 40.0, 40.0], [24.0, 24.0, 56.0, 56.0]
    gt = torch.tensor([[box_a, box_b, [0.0, 0.0, 64.0, 64.0]]])  # third row is padding
    mask = torch.tensor([[[1.0], [1.0], [0.0]]])
    labels = torch.tensor([[[0.0], [2.0], [1.0]]])
    in_a = ((anc > 8) & (anc < 40)).all(1)
    in_b = ((anc > 24) & (anc < 56)).all(1)
    shared = in_a & in_b
    assert shared.sum() == 4
    pd_bboxes = torch.tensor(box_a).expand(1, 64, 4).clone()
    pd_bboxes[0, in_b] = torch.tensor(box_b)  # shared anchors predict box B exactly
    pd_scores = torch.full((1, 64, NC), 0.5)
    a = TaskAlignedAssigner(topk=64, num_classes=NC)
    tl, tb, ts, fg = a(pd_scores, pd_bboxes, anc, labels, gt, mask)
    assert torch.equal(fg[0], in_a | in_b)  # padding row (whole image) assigns nothing more
    assert (tl[0][shared] == 2).all()
    assert torch.allclose(tb[0][shared], torch.tensor(box_b).expand(4, 4))
    assert (tl[0][in_a & ~in_b] == 0).all()


def test_assigner_no_gt():
    a = TaskAlignedAssigner(num_classes=NC)
    tl, tb, ts, fg = a(
        torch.rand(2, 64, NC), torch.rand(2, 64, 4), _grid_anchors(),
        torch.zeros(2, 0, 1), torch.zeros(2, 0, 4), torch.zeros(2, 0, 1),
    )
    assert not fg.any() and ts.sum() == 0 and (tl == NC).all() and tb.shape == (2, 64, 4)


# ---------------------------------------------------------------------------------------------
# loss
def test_loss_finite_and_differentiable_without_targets():
    torch.manual_seed(0)
    model = _TinyModel()
    loss, items = ComputeLoss(model)(model(torch.rand(2, 3, IMG, IMG)), torch.zeros(0, 6))
    assert torch.isfinite(loss) and loss.ndim == 0 and items.shape == (3,)
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_loss_lower_for_matching_predictions():
    model = _TinyModel()
    cl = ComputeLoss(model)
    t = _targets()
    good, good_items = cl(_perfect_preds(t), t)
    bad, bad_items = cl(_random_preds(), t)
    assert torch.isfinite(good) and torch.isfinite(bad)
    assert good < 0.2 * bad
    assert (good_items < bad_items).all()
    assert good_items[0] < 0.05  # box loss ~ 0: decoded boxes equal the gts


def test_loss_value_format_and_gradients_flow():
    torch.manual_seed(0)
    model = _TinyModel()
    preds = model(torch.rand(2, 3, IMG, IMG))
    loss, items = ComputeLoss(model)(preds, _targets())
    assert not items.requires_grad
    assert torch.allclose(loss, items.sum() * 2)  # sum * batch size
    assert (items > 0).all()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dual_head_is_quarter_aux_plus_main():
    model = _TinyModel(dual=True)
    cl = ComputeLoss(model)
    t = _targets()
    d1, d2 = _random_preds(seed=1), _random_preds(seed=2)
    loss, items = cl([d1, d2], t)
    l1, i1 = cl(d1, t)
    l2, i2 = cl(d2, t)
    assert torch.allclose(items, 0.25 * i1 + i2, rtol=1e-5)
    assert torch.allclose(loss, 0.25 * l1 + l2, rtol=1e-5)
    # the eval-mode tuple (inference, train-style outputs) gives the same loss
    loss_eval, _ = cl(([torch.zeros(2, 4 + NC, 84)] * 2, [d1, d2]), t)
    assert torch.allclose(loss_eval, loss)


def test_wrapped_model_and_hyp_gains():
    model = _TinyModel()
    t, preds = _targets(), _random_preds()
    _, items = ComputeLoss(nn.DataParallel(model))(preds, t)
    model.hyp = {"box": 1.0, "cls": 1.0, "dfl": 1.0}
    _, raw = ComputeLoss(model)(preds, t)
    assert torch.allclose(items, raw * torch.tensor([7.5, 0.5, 1.5]))


@pytest.mark.parametrize("dual", [False, True])
def test_sgd_steps_lower_loss_tiny_model(dual):
    torch.manual_seed(0)
    model = _TinyModel(dual=dual)
    cl = ComputeLoss(model)
    imgs, t = torch.rand(2, 3, IMG, IMG), _targets()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, _ = cl(model(imgs), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------
# the real models
@pytest.mark.parametrize("cfg", ["gelan-t", "yolov9-t"])
def test_real_model_loss_and_sgd(cfg):
    yolo = pytest.importorskip("models.yolo")
    torch.manual_seed(0)
    model = yolo.DetectionModel(f"models/detect/{cfg}.yaml", nc=NC)
    model.hyp = dict(HYP)
    model.train()
    cl = ComputeLoss(model)
    imgs, t = torch.rand(2, 3, IMG, IMG), _targets()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    # TAL re-assigns targets as predictions move, so the first steps can rise; 12 steps settle
    for _ in range(12):
        loss, items = cl(model(imgs), t)
        assert torch.isfinite(loss) and items.shape == (3,)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
