"""The upstream YOLOv9 code from PyPI (`yolo9`) as a test-only peer.

yolo9's modules import `utils.general` as a top-level package, which collides with our own `utils`.
`load_peer()` imports it with its own tree first on sys.path and then puts our modules back, so
both live side by side in one process. `pickled_as_upstream()` makes torch.save write the peer's
classes under upstream's module paths (`models.common.Conv`, ...), as a real upstream checkpoint has.
"""
import contextlib
import importlib
import sys
from pathlib import Path

import pytest

_COLLIDING = ("utils", "models")


def _pop_modules(prefixes):
    return {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in prefixes}


_PEER = None


def load_peer():
    """Return (yolo9.models.yolo, yolo9.models.common) or skip the test if yolo9 is missing."""
    global _PEER
    if _PEER is not None:
        return _PEER
    spec = importlib.util.find_spec("yolo9")
    if spec is None:
        pytest.skip("test-only peer 'yolo9' is not installed")
    root = str(Path(spec.origin).parent)
    ours = _pop_modules(_COLLIDING)
    sys.path.insert(0, root)
    try:
        import logging
        yolo = importlib.import_module("yolo9.models.yolo")
        common = importlib.import_module("yolo9.models.common")
        logging.getLogger("yolov5").setLevel(logging.WARNING)
        logging.getLogger("yolo9").setLevel(logging.WARNING)
    finally:
        sys.path.remove(root)
        _pop_modules(_COLLIDING)
        sys.modules.update(ours)
    _PEER = (yolo, common)
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
