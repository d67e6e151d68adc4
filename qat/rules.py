"""Which quantizers must share one scale (DESIGN.md section 3), found by tracing one forward pass.

TensorRT keeps a tensor in INT8 between layers only when every quantizer that reads it, and every
tensor it meets in a Concat or an elementwise Add, uses the same scale. So the groups are classes
of tensors: one small forward pass records every torch operation (a `TorchFunctionMode`) and joins
- a view / chunk / split / slice and its source, a MaxPool or Upsample (nearest) output and its
  input: these ops commute with quantization, TensorRT moves Q/DQ across them;
- all inputs of a Concat (torch.cat / stack) and its output;
- both inputs of an elementwise Add (residual Add, CBFuse sum).
With --residual-quant shortcut, RepNBottleneck quantizes only the shortcut: the Add's other input
(cv2's output) has no quantizer, so the Add joins nothing new and the shortcut's quantizer is grouped
with cv1's input quantizer (both read x), exactly as TensorRT fuses it.
Every activation quantizer reads one or more tensors; quantizers whose tensors fall into one class
form one group. Nothing here knows a layer index or a block type, so it covers every config in
models/detect/ and a user's own yaml: RepNCSPELAN4's chunks, concat and cv4 input; RepNCSP; the
RepNBottleneck shortcut; ADown's pool / MaxPool / cv2; SPPELAN's pools; the neck's Upsample +
Concat + consumer; CBFuse; two convolutions reading one tensor (RepNCSP cv1/cv2, the head's
cv2/cv3) - all come out of the same three rules.
"""
import torch
from torch.overrides import TorchFunctionMode

from qat.modules import WeightQuantizer, is_quantizer

# ops whose output carries its (first) input's scale
_PRESERVE = {"chunk", "split", "split_with_sizes", "tensor_split", "unbind", "view", "view_as", "reshape", "flatten",
             "squeeze", "unsqueeze", "__getitem__", "narrow", "contiguous", "clone", "detach", "to", "float", "pad",
             "max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d", "interpolate",
             "upsample", "upsample_nearest2d", "pixel_shuffle", "permute", "transpose"}
_JOIN = {"cat", "concat", "concatenate", "stack"}  # inputs and output: one class
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__"}  # inputs: one class


class UnionFind:  # disjoint sets; qat.graph uses it too
    def __init__(self):
        self.parent = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class _Recorder(TorchFunctionMode):
    """Joins tensor classes as torch ops run. Tensors are kept alive so their ids stay unique."""

    def __init__(self, uf):
        super().__init__()
        self.uf = uf
        self.alive = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _PRESERVE or name in _JOIN or name in _ADD:
            ins, outs = list(_tensors((args, kwargs))), list(_tensors(out))
            self.alive += ins + outs
            if name in _PRESERVE and ins:
                for t in outs:
                    self.uf.union(id(ins[0]), id(t))
            elif name in _JOIN:
                for t in ins[1:] + outs:
                    self.uf.union(id(ins[0]), id(t))
            elif len(ins) >= 2:
                self.uf.union(id(ins[0]), id(ins[1]))
        return out


def quantizer_slots(model):
    """[(slot name, parent module, attribute, quantizer)] in module order; a quantizer shared by
    several slots appears once per slot."""
    slots = []
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, child in module._modules.items():
            if child is not None and is_quantizer(child):
                slots.append((f"{name}.{attr}" if name else attr, module, attr, child))
    return slots


def example_input(model):
    """A small input every config accepts: two cells of the largest stride, at least 64 px."""
    stride = int(max(getattr(model, "stride", torch.tensor([32.0])))) if hasattr(model, "stride") else 32
    ch = int(getattr(model, "yaml", {}).get("ch", 3)) if isinstance(getattr(model, "yaml", None), dict) else 3
    device = next(model.parameters()).device
    s = max(64, 2 * stride)
    return torch.rand(1, ch, s, s, device=device)


@torch.no_grad()
def trace_groups(model, example=None):
    """All activation-quantizer groups (singletons too) as lists of slot names, in module order."""
    slots = [s for s in quantizer_slots(model) if not isinstance(s[3], WeightQuantizer)]
    objects = {id(q): q for *_, q in slots}
    every = {id(q): q for *_, q in quantizer_slots(model)}
    seen = {k: [] for k in objects}
    uf = UnionFind()

    def pre_hook(module, args):
        seen[id(module)].append(args[0])

    handles = [q.register_forward_pre_hook(pre_hook) for q in objects.values()]
    enabled = {k: q.is_enabled for k, q in every.items()}
    training = model.training
    try:
        for q in every.values():
            q.disable()  # pass-through: the quantizer's output is its input object
        model.eval()
        recorder = _Recorder(uf)
        with recorder:
            model(example if example is not None else example_input(model))
        for tensors in seen.values():  # one quantizer reading several tensors joins them
            for t in tensors[1:]:
                uf.union(id(tensors[0]), id(t))
        keys = {k: uf.find(id(t[0])) if t else ("unused", k) for k, t in seen.items()}
    finally:
        for h in handles:
            h.remove()
        for k, q in every.items():
            if enabled[k]:
                q.enable()
            else:
                q.disable()
        model.train(training)
    groups = {}
    for name, _, _, q in slots:
        groups.setdefault(keys[id(q)], []).append(name)
    return list(groups.values())


def shared_groups(model, example=None):
    """For every Concat / residual Add / MaxPool / Upsample / CBFuse point (and every tensor read
    by several quantizers): the names of the quantizers that must share one scale."""
    return [g for g in trace_groups(model, example) if len(g) > 1]
