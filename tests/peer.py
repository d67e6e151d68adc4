"""The upstream YOLOv9 code from PyPI (`yolo9`) as a test-only peer.

yolo9's modules import `utils.general` as a top-level package, which collides with our own `utils`.
`load_peer()` imports it with its own tree first on sys.path and then puts our modules back, so
both live side by side in one process. `pickled_as_upstream()` makes torch.save write the peer's
classes under upstream's module paths (`models.common.Conv`, ...), as a real upstream checkpoint has.
Below them: helpers the model tests share (configs, BN randomization, output comparison, one thread).
"""
import contextlib
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch

_COLLIDING = ("utils", "models")


def _pop_modules(prefixes):
    return {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in prefixes}


_PEER = None


def peer_module(name):
    """Import the peer module `name` (e.g. 'yolo9.val', 'yolo9.utils.metrics') side by side with ours,
    or skip the test if yolo9 is missing."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("yolo9")
    if spec is None:
        pytest.skip("test-only peer 'yolo9' is not installed (see requirements-test.txt)")
    root = str(Path(spec.origin).parent)
    ours = _pop_modules(_COLLIDING)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(name)
        logging.getLogger("yolov5").setLevel(logging.WARNING)
        logging.getLogger("yolo9").setLevel(logging.WARNING)
    finally:
        sys.path.remove(root)
        _pop_modules(_COLLIDING)
        sys.modules.update(ours)
    return module


def load_peer():
    """Return (yolo9.models.yolo, yolo9.models.common) or skip the test if yolo9 is missing."""
    global _PEER
    if _PEER is None:
        _PEER = (peer_module("yolo9.models.yolo"), peer_module("yolo9.models.common"))
    return _PEER


@contextlib.contextmanager
def pickled_as_upstream():
    """While active, the peer's classes pickle as `models.common.X` / `models.yolo.X`."""
    yolo, common = load_peer()
    saved_mods = {k: sys.modules.get(k) for k in ("models", "models.common", "models.yolo")}
    changed = []
    for mod, name in ((common, "models.common"), (yolo, "models.yolo")):
        for obj in vars(mod).values():
            if isinstance(obj, type) and obj.__module__ == mod.__name__:
                changed.append((obj, obj.__module__))
                obj.__module__ = name
    sys.modules["models.common"], sys.modules["models.yolo"] = common, yolo
    try:
        yield
    finally:
        for obj, m in changed:
            obj.__module__ = m
        for k, v in saved_mods.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# --------------------------------------------------------------------------------------------------
# helpers for comparing our models with the peer's

CONFIGS = ("gelan-t", "gelan-s", "gelan-m", "gelan-c", "gelan-e",
           "yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e")
OUR_CFG_DIR = Path(__file__).resolve().parents[1] / "models" / "detect"


def peer_cfg(name):
    """Path of upstream's own yaml for config `name` (e.g. 'gelan-c'), as shipped in yolo9."""
    yolo, _ = load_peer()
    return Path(yolo.__file__).parent / "detect" / f"{name}.yaml"


def quiet_peer():
    """The peer logs every layer it builds; keep test output readable."""
    for name in ("yolov5", "yolo9", "yolov9"):
        logging.getLogger(name).setLevel(logging.WARNING)


def randomize_bn(model, seed=0):
    """Random BatchNorm running stats and affine parameters, so that BN folding (fuse) changes the
    weights and a mistake in it, or in copying state, shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def flat_tensors(out):
    """Every tensor of a model output (tensors, nested lists and tuples), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for x in out for t in flat_tensors(x)]


def assert_outputs_close(a, b, rtol=1e-4):
    """Same structure, and each tensor equal within rtol of its own largest magnitude."""
    ta, tb = flat_tensors(a), flat_tensors(b)
    assert len(ta) == len(tb), f"{len(ta)} tensors vs {len(tb)}"
    for i, (x, y) in enumerate(zip(ta, tb)):
        assert x.shape == y.shape, f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = y.abs().max().item() or 1.0
        err = (x.float() - y.float()).abs().max().item() / scale
        assert err <= rtol, f"output {i} {tuple(y.shape)}: relative error {err:.2e} > {rtol:.0e}"


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread. On 2 cores shared with other jobs, torch's two OpenMP threads
    mostly wait for each other: these model tests run several times faster on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A dual-head model small enough to pickle and unpickle in a fraction of a second that still holds one of
# every class the detect configs use (Silence, Conv, AConv, ADown, ELAN1, RepNCSPELAN4 with RepNCSP /
# RepNBottleneck / RepConvN, SPPELAN with SP, nn.Upsample, Concat, CBLinear, CBFuse, DualDDetect with DFL).
MINI_DUAL = {
    "nc": 3, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": 3,
    "backbone": [
        [-1, 1, "Silence", []],  # 0
        [-1, 1, "Conv", [16, 3, 2]],  # 1-P1/2
        [-1, 1, "ELAN1", [16, 16, 8]],  # 2
        [-1, 1, "AConv", [32]],  # 3-P2/4
        [-1, 1, "RepNCSPELAN4", [32, 32, 16, 1]],  # 4
        [-1, 1, "ADown", [32]],  # 5-P3/8
        [-1, 1, "ADown", [32]],  # 6-P4/16
        [-1, 1, "ADown", [32]],  # 7-P5/32
    ],
    "head": [
        [-1, 1, "SPPELAN", [32, 16]],  # 8 (P5)
        [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],  # 9
        [[-1, 6], 1, "Concat", [1]],  # 10 (P4)
        [5, 1, "CBLinear", [[16]]],  # 11
        [6, 1, "CBLinear", [[16, 16]]],  # 12
        [0, 1, "Conv", [16, 3, 2]],  # 13-P1/2, auxiliary branch
        [-1, 1, "AConv", [16]],  # 14-P2/4
        [-1, 1, "ADown", [16]],  # 15-P3/8
        [[11, 12, -1], 1, "CBFuse", [[0, 0]]],  # 16
        [-1, 1, "ADown", [16]],  # 17-P4/16
        [[12, -1], 1, "CBFuse", [[1]]],  # 18
        [-1, 1, "ADown", [16]],  # 19-P5/32
        [[16, 18, 19, 5, 10, 8], 1, "DualDDetect", ["nc"]],  # 20
    ],
}
