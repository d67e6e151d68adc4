"""qat.rules + qat.quantize: the shared-scale groups of DESIGN.md section 3 on the real configs.

Each group shares ONE quantizer object (so calibration gives one amax); the members are checked
concretely per block type, and a user's own yaml with another arrangement is covered as well.
The block tests at the end quantize single blocks from scratch and compare every group with one
written by hand, negatives included, so an over-merging or a missing rule fails them."""
import warnings

import pytest
import torch

import torch.nn as nn

from models.common import (ADown, CBFuse, CBLinear, Concat, Conv, ELAN1, RepConvN, RepNBottleneck, RepNCSP,
                           RepNCSPELAN4, SPPELAN)
from qat.calibrate import calibrate
from qat.modules import QuantConv2d, QuantUpsample, WeightQuantizer
from qat.quantize import quantize_model, quantizer_summary
from qat.rules import quantizer_slots, shared_groups
from qat.settings import QuantSettings
from qat_testkit import NC, fp32_model, noise_images

warnings.filterwarnings("ignore", message=".*histogram.*")


def _iq(conv_module):
    """Input quantizer of a Conv (Conv.conv) or of a plain QuantConv2d."""
    conv = conv_module.conv if hasattr(conv_module, "conv") else conv_module
    assert isinstance(conv, QuantConv2d)
    return conv.input_quantizer


def _first_iq(layer):
    """Input quantizer of a layer's first convolution (Conv, or a block's cv1)."""
    return _iq(layer.cv1) if hasattr(layer, "cv1") else _iq(layer)


def _check_blocks(model):
    """Concrete members of every group type present in the model; returns the types seen."""
    seen = set()
    layers = list(model.model)
    for m in model.modules():
        if isinstance(m, RepNCSPELAN4):  # chunks + cv2/cv3 outputs + cv4 input, and half2's readers
            q = m.cat_quantizer
            assert q is _iq(m.cv4) and q is _iq(m.cv2[0].cv1) and q is _iq(m.cv2[0].cv2)
            assert q is _iq(m.cv3[0].cv1) and q is _iq(m.cv3[0].cv2)
            assert q is not _iq(m.cv1) and q is not m.cv2[0].cat_quantizer  # negative: never one scale for all
            seen.add("RepNCSPELAN4")
        elif isinstance(m, ELAN1):
            assert m.cat_quantizer is _iq(m.cv4) and m.cat_quantizer is _iq(m.cv2) and m.cat_quantizer is _iq(m.cv3)
            assert m.cat_quantizer is not _iq(m.cv1)
            seen.add("ELAN1")
        elif isinstance(m, RepNCSP):
            assert m.cat_quantizer is _iq(m.cv3)
            assert _iq(m.cv1) is _iq(m.cv2)  # one tensor read by two convolutions
            assert m.cat_quantizer is not _iq(m.cv1)
            seen.add("RepNCSP")
        elif isinstance(m, RepNBottleneck) and m.add:
            assert m.add_quantizer is _iq(m.cv1.conv) and m.add_quantizer is not _iq(m.cv2)
            seen.add("RepNBottleneck")
        elif isinstance(m, ADown):
            q = m.pool_quantizer
            assert q is _iq(m.cv1) and q is m.maxpool_quantizer and q is _iq(m.cv2)
            assert q is not m.cat_quantizer  # the block's output is another tensor
            seen.add("ADown")
        elif isinstance(m, SPPELAN):
            q = m.cat_quantizer
            assert q is _iq(m.cv5) and all(q is sp.m.input_quantizer for sp in (m.cv2, m.cv3, m.cv4))
            assert q is not _iq(m.cv1)
            seen.add("SPPELAN")
    for i, m in enumerate(layers):
        if isinstance(m, Concat):  # neck: Upsample input, both Concat inputs, the consumer's input
            consumer = layers[i + 1]
            assert consumer.f == -1
            assert m.input_quantizer is _first_iq(consumer)
            ups = [layers[j] for j in m.f if j != -1 and isinstance(layers[j], QuantUpsample)]
            ups += [layers[i - 1]] if isinstance(layers[i - 1], QuantUpsample) else []
            for u in ups:
                assert u.input_quantizer is m.input_quantizer
            seen.add("Concat")
    fuses = [m for m in layers if isinstance(m, CBFuse)]
    if fuses:  # every addend of a CBFuse sum through one quantizer; the CBLinear outputs are split
        # across the levels, so all CBFuse sums (and the resized slices) end up in one class
        assert len({id(m.add_quantizer) for m in fuses}) == 1
        seen.add("CBFuse")
    return seen


EXPECTED = {
    "gelan-t": {"RepNCSPELAN4", "ELAN1", "RepNCSP", "RepNBottleneck", "SPPELAN", "Concat"},
    "gelan-c": {"RepNCSPELAN4", "RepNCSP", "RepNBottleneck", "ADown", "SPPELAN", "Concat"},
    "gelan-e": {"RepNCSPELAN4", "RepNCSP", "RepNBottleneck", "ADown", "SPPELAN", "Concat", "CBFuse"},
    "yolov9-c": {"RepNCSPELAN4", "RepNCSP", "RepNBottleneck", "ADown", "SPPELAN", "Concat", "CBFuse"},
}


@pytest.mark.parametrize("cfg", ["gelan-t", "gelan-c", "gelan-e", "yolov9-c"])
def test_groups_share_one_quantizer(cfg):
    model = quantize_model(fp32_model(cfg), QuantSettings())
    assert _check_blocks(model) == EXPECTED[cfg]

    slots = {name: q for name, _, _, q in quantizer_slots(model)}
    groups = model.qat["groups"]
    assert groups and shared_groups(model) == groups  # re-tracing the quantized model finds the same groups
    for g in groups:
        assert len({id(slots[n]) for n in g}) == 1
    # every conv except the DFL's constant kernel: per-tensor input, per-channel (axis 0) weight
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and ".dfl" not in name:
            assert isinstance(m, QuantConv2d), name
            assert m.input_quantizer.axis is None and m.weight_quantizer.axis == 0
            assert isinstance(m.weight_quantizer, WeightQuantizer)

    calibrate(model, [noise_images(1)], show=False)
    rows = quantizer_summary(model)
    amax = {n: r["amax"] for r in rows for n in r["members"]}
    for g in groups:  # identical amax for all members, and every enabled activation quantizer calibrated
        assert len({amax[n] for n in g}) == 1 and amax[g[0]] > 0
    assert all(r["amax"] is not None for r in rows if r["enabled"])


def test_group_amax_is_the_max_over_its_tensors():
    """max calibration of a shared quantizer = max |x| over every tensor of the group (here the
    RepNCSPELAN4 concat: cv4's input) measured on the FP32 model."""
    fp32 = fp32_model("gelan-t")
    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    x = noise_images(2)
    seen = {}
    h = fp32.model[4].cv4.conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].abs().max()))
    with torch.no_grad():
        fp32(x)
    h.remove()
    calibrate(q, [x], show=False)
    assert torch.allclose(q.model[4].cv4.conv.input_quantizer.amax, seen["x"])


def test_users_own_yaml():
    """No layer tables: another arrangement (three-way neck Concat, top-level MaxPool, RepNCSP as a
    layer, ADown) gets its groups from the same tracing."""
    from models.yolo import DetectionModel

    cfg = {"nc": NC, "depth_multiple": 1.0, "width_multiple": 1.0,
           "backbone": [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "ELAN1", [32, 32, 16]],
                        [-1, 1, "ADown", [64]], [-1, 1, "RepNCSP", [64, 64, 1]], [-1, 1, "nn.MaxPool2d", [3, 2, 1]],
                        [-1, 1, "Conv", [64, 3, 1]]],
           "head": [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4, 3], 1, "Concat", [1]],
                    [-1, 1, "RepNCSPELAN4", [64, 64, 32, 1]], [-1, 1, "ADown", [64]], [[-1, 6], 1, "Concat", [1]],
                    [-1, 1, "SPPELAN", [64, 32]], [[9, 12], 1, "DDetect", [NC]]]}
    model = DetectionModel(cfg, nc=NC).fuse().eval()
    q = quantize_model(model, QuantSettings())
    L = q.model
    # layer 6's output feeds the Upsample and the second Concat; layers 4 and 3 meet it in the 3-way
    # Concat; layer 4's output also feeds the MaxPool, whose output (same scale) feeds layer 6; layer 3
    # is read by RepNCSP's cv1 and cv2; ADown 10's output meets layer 6 in Concat 11: one tensor class
    shared = L[7].input_quantizer
    members = [L[8].input_quantizer, L[9].cv1.conv.input_quantizer, L[5].input_quantizer,
               L[6].conv.input_quantizer, L[4].cv1.conv.input_quantizer, L[4].cv2.conv.input_quantizer,
               L[3].cat_quantizer, L[11].input_quantizer, L[12].cv1.conv.input_quantizer, L[10].cat_quantizer]
    assert all(m is shared for m in members)
    # the avg-pool output is a new tensor: ADown 10's own group; RepNCSPELAN4's concat is internal
    assert L[10].pool_quantizer is L[10].cv2.conv.input_quantizer is L[10].maxpool_quantizer
    assert L[10].pool_quantizer is not shared and L[9].cat_quantizer is not shared
    assert L[9].cat_quantizer is L[9].cv4.conv.input_quantizer
    calibrate(q, [noise_images(1)], show=False)


def test_no_last_layer_and_skip_layers():
    head = "model.22."
    q = quantize_model(fp32_model("gelan-t"), QuantSettings(no_last_layer=True, skip_layers=[r"^model\.12\."]))
    rows = quantizer_summary(q)
    for name, _, _, quantizer in quantizer_slots(q):
        if name.startswith(head) or name.startswith("model.12."):
            assert quantizer._disabled, name
    enabled = [n for r in rows if r["enabled"] for n in r["members"]]
    assert not any(n.startswith((head, "model.12.")) for n in enabled)
    # the neck group loses only layer 12's member: its neighbours stay quantized, sharing one quantizer
    assert q.model[10].input_quantizer is q.model[11].input_quantizer is q.model[20].input_quantizer
    assert not q.model[10].input_quantizer._disabled
    assert q.model[12].cv1.conv.input_quantizer is not q.model[10].input_quantizer
    calibrate(q, [noise_images(1)], show=False)
    assert all(quantizer.amax is None for name, _, _, quantizer in quantizer_slots(q) if name.startswith(head))


# ---------------------------------------------------------------------------------------------------
# Hand-checked groups, block by block (DESIGN.md section 3). The model is quantized from scratch, so
# the groups come from tracing separate quantizers: a wrong rule changes them. Each EXPECTED lists
# every group with more than one member; every other activation quantizer must be alone.

C = 8  # channels of the block tests


def _fused(module):
    """Fold BN and reparameterize RepConvN, as attempt_load does for a whole model."""
    for m in module.modules():
        if isinstance(m, RepConvN):
            m.fuse_convs()
        elif isinstance(m, Conv):
            m.fuse()
    return module.eval()


def _groups(module, example, **settings):
    """quantize_model's groups (slot names) as a set of frozensets; checks that each group really
    is one quantizer object and that no quantizer is shared outside the groups."""
    q = quantize_model(_fused(module), QuantSettings(**settings), example=example)
    groups = {frozenset(g) for g in q.qat["groups"]}
    slots = {name: quantizer for name, _, _, quantizer in quantizer_slots(q)}
    grouped = {n for g in groups for n in g}
    for g in groups:
        assert len({id(slots[n]) for n in g}) == 1, sorted(g)
    alone = [n for n in slots if n not in grouped]
    assert len({id(slots[n]) for n in alone}) == len(alone)  # every other slot has its own quantizer
    return groups


def _x(c=C, s=16):
    return torch.rand(1, c, s, s, generator=torch.Generator().manual_seed(0))


def test_elan1_groups():
    """cv1's output halves, cv2 / cv3 outputs (= cv2 / cv3 inputs) and cv4's input: one scale.
    cv1's input is the block's input: a scale of its own."""
    groups = _groups(ELAN1(C, C, C, C // 2), _x())
    assert groups == {frozenset({"cat_quantizer", "cv2.conv.input_quantizer", "cv3.conv.input_quantizer",
                                 "cv4.conv.input_quantizer"})}
    assert not any("cv1.conv.input_quantizer" in g for g in groups)  # negative: not with cv4's input


@pytest.mark.parametrize("residual_quant", ["both", "shortcut"])
def test_repncspelan4_groups(residual_quant):
    """The ELAN concat (cv1 halves, cv2/cv3 outputs, cv4 input), which also holds both RepNCSP's
    cv1/cv2 inputs (they read a concat member); inside each RepNCSP its own concat + cv3 input, and
    the bottleneck's shortcut with its cv1 input. The bottleneck's cv2 input and the Conv after each
    RepNCSP read tensors nobody else reads: alone."""
    groups = _groups(RepNCSPELAN4(C, C, C, C // 2, 1), _x(), residual_quant=residual_quant)
    assert groups == {
        frozenset({"cat_quantizer", "cv4.conv.input_quantizer",
                   "cv2.0.cv1.conv.input_quantizer", "cv2.0.cv2.conv.input_quantizer",
                   "cv3.0.cv1.conv.input_quantizer", "cv3.0.cv2.conv.input_quantizer"}),
        frozenset({"cv2.0.cat_quantizer", "cv2.0.cv3.conv.input_quantizer"}),
        frozenset({"cv3.0.cat_quantizer", "cv3.0.cv3.conv.input_quantizer"}),
        frozenset({"cv2.0.m.0.add_quantizer", "cv2.0.m.0.cv1.conv.input_quantizer"}),
        frozenset({"cv3.0.m.0.add_quantizer", "cv3.0.m.0.cv1.conv.input_quantizer"}),
    }


def test_adown_groups():
    """Quantized once after the avg-pool: both halves carry that scale, so cv1's input, the MaxPool
    input and cv2's input (MaxPool commutes with quantization) are one group. The concat of the two
    results is the block's output: its quantizer belongs to whatever reads the block (here nothing)."""
    groups = _groups(ADown(C, C), _x())
    assert groups == {frozenset({"pool_quantizer", "cv1.conv.input_quantizer", "maxpool_quantizer",
                                 "cv2.conv.input_quantizer"})}
    assert not any("cat_quantizer" in g for g in groups)


def test_sppelan_groups():
    """cv1's output, the three chained max pools, the concat of four and cv5's input: one scale;
    cv1's input is separate."""
    groups = _groups(SPPELAN(C, C, C // 2), _x())
    assert groups == {frozenset({"cat_quantizer", "cv2.m.input_quantizer", "cv3.m.input_quantizer",
                                 "cv4.m.input_quantizer", "cv5.conv.input_quantizer"})}


def test_blocks_in_a_row_keep_their_own_groups():
    """Negative case across blocks: ELAN1 -> ADown -> SPPELAN. Each block's internal group stays its
    own; the only group that crosses a boundary is ADown's concat with SPPELAN's cv1 input (a tensor
    read where it is made). ELAN1's output enters ADown through the avg-pool (a new tensor)."""
    groups = _groups(nn.Sequential(ELAN1(C, C, C, C // 2), ADown(C, C), SPPELAN(C, C, C // 2)), _x())
    assert groups == {
        frozenset({"0.cat_quantizer", "0.cv2.conv.input_quantizer", "0.cv3.conv.input_quantizer",
                   "0.cv4.conv.input_quantizer"}),
        frozenset({"1.pool_quantizer", "1.cv1.conv.input_quantizer", "1.maxpool_quantizer",
                   "1.cv2.conv.input_quantizer"}),
        frozenset({"1.cat_quantizer", "2.cv1.conv.input_quantizer"}),
        frozenset({"2.cat_quantizer", "2.cv2.m.input_quantizer", "2.cv3.m.input_quantizer",
                   "2.cv4.m.input_quantizer", "2.cv5.conv.input_quantizer"}),
    }


class _CBFuseNet(nn.Module):
    """gelan-e / yolov9-e routing in miniature (its layers 10, 11, 16, 18): CBLinear l1 with one
    output, l2 (one level down) split in two; an auxiliary branch of ADown blocks. f1 adds three
    addends (l1's, l2's first slice, resized, and an ADown output), f2 two (l2's second slice and the
    next ADown output); an ELAN1 and a Conv consume the sums."""

    def __init__(self, c=C):
        super().__init__()
        self.l1 = CBLinear(c, [c])
        self.d1 = Conv(c, c, 3, 2)
        self.l2 = CBLinear(c, [c, c])
        self.a1 = ADown(c, c)
        self.f1 = CBFuse([0, 0])
        self.e = ELAN1(c, c, c, c // 2)
        self.a2 = ADown(c, c)
        self.f2 = CBFuse([1])
        self.out = Conv(c, c, 1)

    def forward(self, x):
        l1, l2 = self.l1(x), self.l2(self.d1(x))
        y = self.e(self.f1([l1, l2, self.a1(x)]))
        return self.out(self.f2([l2, self.a2(y)]))


def test_cbfuse_groups():
    """All addends of a CBFuse sum: one scale. l2's output is split across both sums, so both sums
    are one group, with each ADown concat that produces a last addend. The sum itself is a new
    tensor: the ELAN1 / Conv reading it, and the CBLinear inputs, are not in that group."""
    groups = _groups(_CBFuseNet(), _x(s=32))
    assert groups == {
        frozenset({"f1.add_quantizer", "f2.add_quantizer", "a1.cat_quantizer", "a2.cat_quantizer"}),
        frozenset({"l1.conv.input_quantizer", "d1.conv.input_quantizer"}),  # one tensor, two convolutions
        frozenset({"a1.pool_quantizer", "a1.cv1.conv.input_quantizer", "a1.maxpool_quantizer",
                   "a1.cv2.conv.input_quantizer"}),
        frozenset({"a2.pool_quantizer", "a2.cv1.conv.input_quantizer", "a2.maxpool_quantizer",
                   "a2.cv2.conv.input_quantizer"}),
        frozenset({"e.cat_quantizer", "e.cv2.conv.input_quantizer", "e.cv3.conv.input_quantizer",
                   "e.cv4.conv.input_quantizer"}),
    }


class _PlainAdd(nn.Module):
    """An elementwise Add no quantized block owns (a user's own module of plain convolutions): both
    addends are also read by convolutions, whose input quantizers must then share the Add's scale."""

    def __init__(self, c=C):
        super().__init__()
        self.cv1, self.cv2, self.cv3, self.cv4 = (Conv(c, c, 3, 1) for _ in range(4))

    def forward(self, x):
        a = self.cv1(x)
        b = self.cv2(a)
        return self.cv4(a + b), self.cv3(b)


def test_plain_add_joins_its_inputs():
    groups = _groups(_PlainAdd(), _x())
    assert groups == {frozenset({"cv2.conv.input_quantizer", "cv3.conv.input_quantizer"})}
