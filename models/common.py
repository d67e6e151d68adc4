"""Building blocks of the YOLOv9 / GELAN detection family.

Class names, constructor arguments, attribute names and therefore state_dict keys follow upstream
YOLOv9 exactly, so that checkpoints pickled by upstream (`models.common.RepNCSPELAN4`, ...) unpickle
into these classes. Fused (BN-folded / reparameterized) modules are recognised by which attributes
they hold, so a module never needs its `forward` swapped per instance.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def autopad(k, p=None, d=1):
    """Padding that keeps the spatial size ('same') for kernel k and dilation d."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def _empty_conv_like(conv):
    """A Conv2d with conv's geometry, device and dtype and a bias, left uninitialised (built on the meta
    device: its values are overwritten at once, so no time goes into a random init)."""
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=True, device="meta", dtype=conv.weight.dtype)
    return new.to_empty(device=conv.weight.device)


def fuse_conv_and_bn(conv, bn):
    """Fold a BatchNorm2d into the preceding Conv2d; returns a new Conv2d with bias."""
    fused = _empty_conv_like(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation (SiLU by default). After fuse() the BN is folded away."""
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        if getattr(self, "bn", None) is not None:
            y = self.bn(y)
        return self.act(y)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    def fuse(self):
        if getattr(self, "bn", None) is not None:
            self.conv = fuse_conv_and_bn(self.conv, self.bn)
            del self.bn


class AConv(nn.Module):
    """Average-pool (2, stride 1) then a stride-2 3x3 Conv."""

    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x):
        return self.cv1(F.avg_pool2d(x, 2, 1, 0, False, True))


class ADown(nn.Module):
    """Average-pool, split channels: one half through a stride-2 3x3 Conv, the other through
    MaxPool(3, 2, 1) and a 1x1 Conv; concatenate."""

    def __init__(self, c1, c2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x):
        x1, x2 = F.avg_pool2d(x, 2, 1, 0, False, True).chunk(2, 1)
        return torch.cat((self.cv1(x1), self.cv2(F.max_pool2d(x2, 3, 2, 1))), 1)


class RepConvN(nn.Module):
    """Re-parameterizable 3x3 + 1x1 convolution (no identity branch). fuse_convs() merges both
    branches into a single 3x3 conv held as `self.conv`."""
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        if k != 3 or p != 1:
            raise ValueError("RepConvN supports k=3, p=1 only")
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.bn = None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x):
        if "conv" in self._modules:  # reparameterized
            return self.act(self.conv(x))
        identity = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + identity)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    @staticmethod
    def _branch_kernel_bias(branch):
        """Equivalent (kernel, bias) of a Conv branch, BN folded in (whether or not already fused)."""
        if getattr(branch, "bn", None) is None:
            w = branch.conv.weight
            bias = branch.conv.bias if branch.conv.bias is not None else w.new_zeros(w.shape[0])
            return branch.conv.weight, bias
        bn = branch.bn
        std = (bn.running_var + bn.eps).sqrt()
        return branch.conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    def get_equivalent_kernel_bias(self):
        k3, b3 = self._branch_kernel_bias(self.conv1)
        k1, b1 = self._branch_kernel_bias(self.conv2)
        return k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1

    def fuse_convs(self):
        if "conv" in self._modules:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = _empty_conv_like(self.conv1.conv)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        self.conv = conv
        del self.conv1, self.conv2
        if hasattr(self, "bn"):
            del self.bn
        if hasattr(self, "id_tensor"):
            del self.id_tensor


class SP(nn.Module):
    """Stride-1 max pooling with 'same' padding (used in SPPELAN)."""

    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x):
        return self.m(x)


class DFL(nn.Module):
    """Distribution Focal Loss integral: expected value of a softmax over reg_max bins."""

    def __init__(self, c1=17):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class RepNBottleneck(nn.Module):
    """RepConvN 3x3 -> Conv 3x3, with a residual Add when shapes allow."""

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """CSP block: cv1 -> bottlenecks and cv2 in parallel, concatenated into cv3."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along `d`."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Silence(nn.Module):
    """Identity; the input placeholder of dual-branch (PGI) models."""

    def forward(self, x):
        return x


class SPPELAN(nn.Module):
    """cv1 -> three chained 5x5 max pools -> concat of the four -> cv5."""

    def __init__(self, c1, c2, c3):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = SP(5)
        self.cv3 = SP(5)
        self.cv4 = SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x):
        y = [self.cv1(x)]
        for m in (self.cv2, self.cv3, self.cv4):
            y.append(m(y[-1]))
        return self.cv5(torch.cat(y, 1))


class ELAN1(nn.Module):
    """ELAN with plain convolutions: split cv1's output in two, chain cv2 and cv3 on the second
    half, concatenate all four into cv4."""

    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in (self.cv2, self.cv3):
            y.append(m(y[-1]))
        return self.cv4(torch.cat(y, 1))


class RepNCSPELAN4(nn.Module):
    """GELAN block: like ELAN1 with RepNCSP + Conv stages."""

    def __init__(self, c1, c2, c3, c4, c5=1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in (self.cv2, self.cv3):
            y.append(m(y[-1]))
        return self.cv4(torch.cat(y, 1))


class CBLinear(nn.Module):
    """One conv whose output is split into several routing tensors (CBNet-style)."""

    def __init__(self, c1, c2s, k=1, s=1, p=None, g=1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, s, autopad(k, p), groups=g, bias=True)

    def forward(self, x):
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Resize selected CBLinear outputs to the last input's size (nearest) and sum everything."""

    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, xs):
        size = xs[-1].shape[2:]
        out = xs[-1]
        for i, x in enumerate(xs[:-1]):
            out = out + F.interpolate(x[self.idx[i]], size=size, mode="nearest")
        return out
