"""YOLOv9 detection model: yaml parsing, detection heads, fusing.

Layer names in a yaml are resolved through MODULES, an explicit registry of allowed classes; a yaml
(which may come from a stranger) is never passed to eval().
"""
import ast
import math
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from models.common import (DFL, ELAN1, SP, SPPELAN, AConv, ADown, CBFuse, CBLinear, Concat, Conv, RepConvN,
                           RepNCSP, RepNCSPELAN4, Silence)
from utils.general import LOGGER, UserError, make_divisible
from utils.tal.anchor_generator import dist2bbox, make_anchors


class DDetect(nn.Module):
    """Anchor-free decoupled head with DFL box regression (one set of P3-P5 inputs)."""
    dynamic = False  # rebuild anchors on every call
    export = False  # export mode: return only the decoded predictions
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = 16
        self.no = nc + self.reg_max * 4
        self.inplace = inplace
        self.stride = torch.zeros(self.nl)
        c2 = make_divisible(max((ch[0] // 4, self.reg_max * 4, 16)), 4)
        c3 = max((ch[0], min((self.nc * 2, 128))))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3, g=4), nn.Conv2d(c2, 4 * self.reg_max, 1, groups=4))
            for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max)

    def _decode(self, feats, dfl):
        """Raw per-level maps -> (B, 4+nc, anchors): xywh in input pixels, class probabilities."""
        b = feats[0].shape[0]
        box, cls = torch.cat([f.view(b, self.no, -1) for f in feats], 2).split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)

    def _update_anchors(self, feats):
        shape = feats[0].shape
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in make_anchors(feats, self.stride, 0.5))
            self.shape = shape

    def forward(self, x):
        x = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]
        if self.training:
            return x
        self._update_anchors(x)
        y = self._decode(x, self.dfl)
        return y if self.export else (y, x)

    def bias_init(self):
        """Prior biases: box logits 1.0, class logits for ~5 objects per 640 image."""
        for a, b, s in zip(self.cv2, self.cv3, self.stride):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)


class DualDDetect(DDetect):
    """Two DDetect heads: auxiliary (cv2, cv3, dfl) on the first nl inputs and main (cv4, cv5, dfl2)
    on the last nl inputs (PGI training). Outputs are [aux, main]."""

    def __init__(self, nc=80, ch=(), inplace=True):
        nl = len(ch) // 2
        super().__init__(nc, ch[:nl], inplace)
        # re-register dfl after cv4/cv5, so module and state_dict order is upstream's
        # (cv2 cv3 cv4 cv5 dfl dfl2): optimizer states index parameters in that order
        dfl = self._modules.pop("dfl")
        c4 = make_divisible(max((ch[nl] // 4, self.reg_max * 4, 16)), 4)
        c5 = max((ch[nl], min((self.nc * 2, 128))))
        self.cv4 = nn.ModuleList(
            nn.Sequential(Conv(x, c4, 3), Conv(c4, c4, 3, g=4), nn.Conv2d(c4, 4 * self.reg_max, 1, groups=4))
            for x in ch[nl:])
        self.cv5 = nn.ModuleList(nn.Sequential(Conv(x, c5, 3), Conv(c5, c5, 3), nn.Conv2d(c5, self.nc, 1))
                                 for x in ch[nl:])
        self.dfl = dfl
        self.dfl2 = DFL(self.reg_max)

    def forward(self, x):
        d1 = [torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1) for i in range(self.nl)]
        d2 = [torch.cat((self.cv4[i](x[self.nl + i]), self.cv5[i](x[self.nl + i])), 1) for i in range(self.nl)]
        if self.training:
            return [d1, d2]
        self._update_anchors(d1)
        y = [self._decode(d1, self.dfl), self._decode(d2, self.dfl2)]
        return y if self.export else (y, [d1, d2])

    def bias_init(self):
        super().bias_init()
        for a, b, s in zip(self.cv4, self.cv5, self.stride):
            a[-1].bias.data[:] = 1.0
            b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)


HEADS = (DDetect, DualDDetect)

# Every module a yaml may name. Anything else is refused with a clear error.
MODULES = {cls.__name__: cls for cls in (Conv, AConv, ADown, RepNCSPELAN4, ELAN1, SPPELAN, SP, RepNCSP, RepConvN,
                                          Concat, Silence, CBLinear, CBFuse, DDetect, DualDDetect)}
MODULES.update({"nn.Upsample": nn.Upsample, "nn.MaxPool2d": nn.MaxPool2d, "nn.Identity": nn.Identity,
                "nn.BatchNorm2d": nn.BatchNorm2d})
ACTIVATIONS = {"nn.SiLU": nn.SiLU, "nn.ReLU": nn.ReLU, "nn.LeakyReLU": nn.LeakyReLU, "nn.Hardswish": nn.Hardswish,
               "nn.ReLU6": nn.ReLU6, "nn.Identity": nn.Identity}
CHANNEL_MODULES = (Conv, AConv, ADown, ELAN1, RepNCSPELAN4, SPPELAN)


def _parse_activation(text):
    """'nn.LeakyReLU(0.1)' -> nn.LeakyReLU(0.1), through ACTIVATIONS and literal arguments only."""
    name, _, rest = text.partition("(")
    if name.strip() not in ACTIVATIONS:
        raise UserError(f"model yaml: activation '{text}' is not supported; use one of {sorted(ACTIVATIONS)}")
    args = ast.literal_eval(f"({rest.rstrip(')')},)") if rest.strip(") ") else ()
    return ACTIVATIONS[name.strip()](*args)


def _check_row(i, row, n_before):
    """One `[from, number, module, args]` row of a model yaml: shapes and indices, before anything
    is built from it (a yaml can come from a stranger's checkpoint: errors must be one line)."""
    def bad(why):
        raise UserError(f"model yaml: layer {i} {str(row)[:80]}: {why}")

    if not isinstance(row, (list, tuple)) or len(row) != 4:
        bad("a layer is [from, number, module, args] (4 fields)")
    f, n, m, args = row
    froms = f if isinstance(f, list) else [f]
    if not froms or not all(isinstance(x, int) and not isinstance(x, bool) for x in froms):
        bad("'from' must be a layer index or a list of them")
    for x in froms:
        if i == 0 and x != -1:
            bad(f"'from' {x}: the first layer reads the input image, 'from' -1")
        if i and not -n_before <= x < n_before:
            bad(f"'from' {x} is not an earlier layer (layers 0..{n_before - 1}, or -k for k layers back)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        bad("'number' must be a whole number >= 1")
    if not isinstance(m, str) or m not in MODULES:
        raise UserError(f"model yaml: layer {i} names unknown module '{m}'; known: {', '.join(sorted(MODULES))}")
    if not isinstance(args, list) or not all(isinstance(a, (int, float, str, list, type(None))) for a in args):
        bad("'args' must be a list of numbers, names or lists")
    for a in args:
        if isinstance(a, str) and a not in ("nc", "None", "nearest", "bilinear", "bicubic", "nearest-exact"):
            bad(f"argument {a!r} is not a literal (only numbers, lists, 'nc', 'None' and upsample modes are allowed)")


def _resolve_arg(a, nc):
    """yaml args are literals; the strings 'nc' and 'None' are the only names upstream uses."""
    if a == "nc":
        return nc
    if a == "None":
        return None
    return a


def parse_model(d, ch):
    """Build nn.Sequential of layers from a model dict (upstream format). Returns (model, savelist)."""
    nc, gd, gw = d.get("nc"), d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise UserError(f"model yaml: nc must be the number of classes (a whole number >= 1), got {nc!r}")
    for key, v in (("depth_multiple", gd), ("width_multiple", gw)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 16:
            raise UserError(f"model yaml: {key} must be a number in (0, 16], got {v!r}")
    act = d.get("activation")
    if act:  # class-level default, as upstream; affects modules built after this call
        Conv.default_act = RepConvN.default_act = _parse_activation(act)
    LOGGER.debug(f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    layers, save, c2 = [], [], ch[-1]
    try:
        rows = d["backbone"] + d["head"]
    except (KeyError, TypeError) as e:
        raise UserError(f"model yaml: needs 'backbone' and 'head' lists ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError("model yaml: 'backbone' and 'head' must be non-empty lists of [from, number, module, args]")
    for i, row in enumerate(rows):
        _check_row(i, row, n_before=len(layers))
        f, n, name, args = row
        m = MODULES[name]
        try:  # a malformed row (a stranger's yaml) is one line, not a traceback from inside a module
            args = [_resolve_arg(a, nc) for a in args]
            n = n_ = max(round(n * gd), 1) if n > 1 else n
            if m in CHANNEL_MODULES:
                c1, c2 = ch[f], make_divisible(args[0] * gw, 8)
                args = [c1, c2, *args[1:]]
            elif m is nn.BatchNorm2d:
                args = [ch[f]]
            elif m is Concat:
                c2 = sum(ch[x] for x in f)
            elif m is CBLinear:
                c1, c2 = ch[f], args[0]
                args = [c1, c2, *args[1:]]
            elif m is CBFuse:
                c2 = ch[f[-1]]
            elif m in HEADS:
                args.append([ch[x] for x in f])
            else:
                c2 = ch[f]
            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError, AttributeError) as e:
            raise UserError(f"model yaml: layer {i} {row}: {name} cannot be built from these arguments "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        t = f"{m.__module__}.{m.__name__}"
        np_ = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type, m_.np = i, f, t, np_
        LOGGER.debug(f"{i:>3}{str(f):>18}{n_:>3}{np_:10.0f}  {t:<40}{str(args):<30}")
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def load_model_yaml(cfg):
    """Model yaml path or dict -> dict. Missing or malformed files are one-line UserErrors."""
    if isinstance(cfg, dict):
        return deepcopy(cfg)
    path = Path(cfg)
    if not path.is_file():
        candidate = Path(__file__).parent / "detect" / path.name
        if candidate.is_file():
            path = candidate
        else:
            raise UserError(f"model yaml '{cfg}' not found; pass a file such as models/detect/gelan-c.yaml")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8", errors="ignore"))
    except yaml.YAMLError as e:
        raise UserError(f"model yaml '{cfg}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict) or "nc" not in d:
        raise UserError(f"model yaml '{cfg}' is not a model config (no 'nc', 'backbone', 'head')")
    return d


class BaseModel(nn.Module):
    def forward(self, x):
        return self._forward_once(x)

    def _forward_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self):
        """Fold every BatchNorm into its conv and reparameterize RepConvN (in place)."""
        for m in self.model.modules():
            if isinstance(m, RepConvN):
                m.fuse_convs()
            elif isinstance(m, Conv):
                m.fuse()
        return self

    def is_fused(self):
        return not any(isinstance(m, nn.BatchNorm2d) for m in self.modules())

    def info(self, img_size=640):
        n_p = sum(x.numel() for x in self.parameters())
        LOGGER.info(f"{type(self).__name__}: {len(list(self.modules()))} modules, {n_p:,} parameters")

    def _apply(self, fn, *args, **kwargs):
        # keep the head's non-buffer tensors on the model's device/dtype
        self = super()._apply(fn, *args, **kwargs)
        m = self.model[-1]
        if isinstance(m, HEADS):
            m.stride = fn(m.stride)
            m.anchors = fn(m.anchors)
            m.strides = fn(m.strides)
        return self


class DetectionModel(BaseModel):
    def __init__(self, cfg="yolo.yaml", ch=3, nc=None, anchors=None):
        super().__init__()
        self.yaml = load_model_yaml(cfg)
        if not isinstance(cfg, dict):
            self.yaml_file = Path(cfg).name
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.inplace = self.yaml.get("inplace", True)

        m = self.model[-1]
        if isinstance(m, HEADS):
            m.inplace = self.inplace
            try:
                m.stride = self._head_strides(ch)
            except RuntimeError as e:  # layers whose shapes do not fit together (a malformed yaml)
                detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise UserError(f"model yaml: the layers do not fit together ({detail})") from None
            self.stride = m.stride
            m.bias_init()
        initialize_weights(self)

    @torch.no_grad()
    def _head_strides(self, ch):
        """Head input strides (input size / feature map size), as upstream measures them with a forward
        pass of a 256 px image. Here the image is as small as gives every level at least 2x2 cells (64 px
        for P3-P5), in eval mode so no BatchNorm statistics change: building gelan-e costs a 64 px forward
        instead of a 256 px one. The head stays in train mode (raw maps, no anchors cached on it)."""
        training = self.training
        self.eval()
        self.model[-1].train()
        try:
            for s in (64, 128, 256, 512):
                out = self.forward(torch.zeros(1, ch, s, s))
                feats = out[0] if isinstance(self.model[-1], DualDDetect) else out
                if min(x.shape[-2] for x in feats) >= 2:
                    break
        finally:
            self.train(training)
        return torch.tensor([s / x.shape[-2] for x in feats])

    def forward(self, x, augment=False, profile=False, visualize=False):
        return self._forward_once(x)


Model = DetectionModel  # upstream alias


def initialize_weights(model):
    """Upstream's BN settings (eps 1e-3, momentum 0.03) and in-place activations."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif type(m) in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True
