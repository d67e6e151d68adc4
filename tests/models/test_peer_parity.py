"""Our models against upstream YOLOv9 (the `yolo9` peer): same layers, same state_dict, same outputs."""
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
import yaml

from models.yolo import DetectionModel, DualDDetect, load_model_yaml, parse_model
from tests.peer import one_thread  # noqa: F401  (fixture)
from tests.peer import (CONFIGS, MINI_DUAL, OUR_CFG_DIR, assert_outputs_close, load_peer, peer_cfg, quiet_peer,
                        randomize_bn)

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 64  # smallest size that keeps all three levels (P5 is 2x2)
# the peer builds big models with a real 256 px forward (tens of seconds on 2 busy cores); for these the
# test assembles the peer's model from the peer's own parse_model and takes strides from ours (checked
# equal to the peer's on the configs it builds in full)
PEER_FULL_BUILD = {"gelan-t", "gelan-s", "gelan-m", "yolov9-t", "yolov9-s", "yolov9-m"}
# gelan-e is the main branch of yolov9-e (same classes, same blocks): its
# layers are compared below, its outputs through yolov9-e (and tests/tools/test_reparameterize)
OUTPUT_CONFIGS = ("gelan-t", "gelan-s", "gelan-m", "gelan-c",
                  "yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e")


@pytest.fixture(scope="module")
def peer():
    yolo, common = load_peer()
    quiet_peer()
    return yolo


def _peer_model(peer, name, stride):
    if name in PEER_FULL_BUILD:
        m = peer.DetectionModel(str(peer_cfg(name)))
        assert torch.equal(m.stride, stride), f"strides {m.stride.tolist()} vs ours {stride.tolist()}"
        return m
    m = peer.DetectionModel.__new__(peer.DetectionModel)
    nn.Module.__init__(m)
    m.yaml = yaml.safe_load(peer_cfg(name).read_text())
    m.model, m.save = peer.parse_model(deepcopy(m.yaml), ch=[3])
    m.model[-1].stride = m.stride = stride.clone()
    peer.initialize_weights(m)  # BatchNorm eps 1e-3 (not in the state_dict) as the full build sets it
    return m


@pytest.mark.parametrize("name", CONFIGS)
def test_layers_match_upstream(peer, name):
    """Config text, layer graph, state_dict keys (in order), shapes and parameter count. Built on the
    meta device: shapes without memory or init time, so even yolov9-e costs nothing."""
    ours_yaml = load_model_yaml(OUR_CFG_DIR / f"{name}.yaml")
    theirs_yaml = yaml.safe_load(peer_cfg(name).read_text())
    assert ours_yaml == theirs_yaml
    with torch.device("meta"):
        ours, ours_save = parse_model(deepcopy(ours_yaml), ch=[3])
        theirs, theirs_save = peer.parse_model(deepcopy(theirs_yaml), ch=[3])
    assert ours_save == theirs_save
    for a, b in zip(ours, theirs, strict=True):
        assert (a.i, a.f, a.np) == (b.i, b.f, b.np)
        assert a.type == b.type.replace("yolo9.", ""), f"layer {a.i}: {a.type} vs {b.type}"
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    assert [tuple(v.shape) for v in so.values()] == [tuple(v.shape) for v in st.values()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]  # optimizer order
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", OUTPUT_CONFIGS)
def test_outputs_match_upstream(peer, name):
    """Same weights (random, BN stats randomized) -> same eval outputs, before and after fuse()."""
    torch.manual_seed(0)
    ours = DetectionModel(OUR_CFG_DIR / f"{name}.yaml")
    theirs = randomize_bn(_peer_model(peer, name, ours.stride), seed=1)
    ours.load_state_dict(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.eval(), theirs.eval()
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        ref = theirs(x)
        out = ours(x)
        assert_outputs_close(out, ref)
        if isinstance(ours.model[-1], DualDDetect):  # ([y_aux, y_main], [d_aux, d_main]) as upstream
            assert len(out[0]) == 2 and out[0][1].shape == (1, 4 + 80, (IMG // 8) ** 2 * 21 // 16)
        else:
            assert out[0].shape == (1, 4 + 80, (IMG // 8) ** 2 * 21 // 16)
        ours.fuse(), theirs.fuse()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
        fused = ours(x)
        assert_outputs_close(fused, theirs(x))
        assert_outputs_close(fused, ref)


@pytest.mark.parametrize("name", ["gelan-t", "yolov9-t"])
def test_train_outputs_match_upstream(peer, name):
    """Train-mode forward: raw maps (DualDDetect: [aux, main]), as the loss receives them."""
    torch.manual_seed(0)
    ours = DetectionModel(OUR_CFG_DIR / f"{name}.yaml", nc=3)
    theirs = peer.DetectionModel(str(peer_cfg(name)), nc=3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(2, 3, IMG, IMG)
    assert_outputs_close(ours(x), theirs(x))
    # both updated their BN running stats from the same batch
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), k


def test_every_module_class_matches_upstream(peer):
    """A small dual model holding one of every module class: state_dict, outputs, fused outputs."""
    torch.manual_seed(0)
    ours = DetectionModel(deepcopy(MINI_DUAL))
    theirs = randomize_bn(peer.DetectionModel(deepcopy(MINI_DUAL)), seed=2)
    assert torch.equal(ours.stride, theirs.stride)
    shapes = [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == shapes
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.rand(2, 3, IMG, 2 * IMG)  # not square
    with torch.no_grad():
        ref = theirs(x)
        assert_outputs_close(ours(x), ref)
        assert_outputs_close(ours.fuse()(x), theirs.fuse()(x))
