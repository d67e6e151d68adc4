"""qat/compat.py: our own objects in this repository, working fallbacks in an upstream clone."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A minimal upstream-shaped tree: upstream's module names, none of our additions.
STUB_UPSTREAM = {
    "utils/__init__.py": "",
    "utils/general.py": """
        import logging
        LOGGER = logging.getLogger("upstream")


        def init_seeds(seed=0, deterministic=False):
            pass
        """,
    "utils/torch_utils.py": """
        def select_device(device=""):
            return device
        """,
    "models/__init__.py": "",
    "models/common.py": """
        import torch.nn as nn


        class Conv(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.act = nn.Conv2d(3, 4, 3), nn.SiLU()

            def forward(self, x):
                return self.act(self.conv(x))
        """,
    "models/yolo.py": """
        import torch
        import torch.nn as nn
        from models.common import *  # noqa: F403  (as upstream)


        class DetectionModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = nn.Sequential(Conv())  # noqa: F405
                self.stride, self.names = torch.tensor([8.0, 16.0, 32.0]), ["a"]

            def forward(self, x):
                return self.model(x)

            def fuse(self):
                self.fused = True
                return self
        """,
    "models/experimental.py": """
        def attempt_load(weights, device=None, inplace=True, fuse=True):
            raise RuntimeError("upstream's unpickle-anything loader must not be used")
        """,
    "qat/__init__.py": "",
}

SCRIPT = """
import numpy as np
import torch
from qat import compat
from models.yolo import DetectionModel

assert compat.UserError.__module__ == "qat.compat" and compat.run_cli.__module__ == "qat.compat"
m = DetectionModel().eval()
compat.save_atomic({"model": m, "ema": None, "epoch": 3, "best_fitness": np.float64(0.5), "opt": {"imgsz": 64}},
                   "w/ok.pt")
assert sorted(p.name for p in __import__("pathlib").Path("w").iterdir()) == ["ok.pt"]
assert compat.load_checkpoint("w/ok.pt")["epoch"] == 3
model = compat.attempt_load("w/ok.pt")
x = torch.rand(1, 3, 16, 16)
assert model.fused and not model.training and model.names == {0: "a"} and torch.equal(model(x), m(x))


class Evil:
    def __reduce__(self):
        return (print, ("EXECUTED",))


torch.save({"model": m, "x": Evil()}, "w/evil.pt")
for bad in ("w/evil.pt", "w/missing.pt"):
    try:
        compat.load_checkpoint(bad)
        raise SystemExit(f"{bad} was accepted")
    except compat.UserError as e:
        print("refused:", e)


def main():
    raise compat.UserError("bad input, one line")


compat.run_cli(main)
"""


def test_compat_fallbacks_in_an_upstream_tree(tmp_path):
    for rel, text in STUB_UPSTREAM.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip("\n"))
    for rel in ("qat/compat.py", "qat/upstream_env.py", "utils/safe_unpickle.py"):  # what install.py copies
        (tmp_path / rel).write_bytes((REPO / rel).read_bytes())
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "EXECUTED" not in r.stdout + r.stderr
    assert "refused: weights 'w/evil.pt' was refused by the safe loader" in r.stdout
    assert "refused: weights file 'w/missing.pt' not found" in r.stdout
    assert r.stderr.strip().splitlines() == ["error: bad input, one line"]


def test_compat_is_our_own_objects_here():
    code = ("from qat import compat\nimport utils.general as g, utils.torch_utils as t, models.experimental as e\n"
            "assert compat.UserError is g.UserError and compat.run_cli is g.run_cli\n"
            "assert compat.save_atomic is t.save_atomic and compat.init_seeds is t.init_seeds\n"
            "assert compat.load_checkpoint is e.load_checkpoint and compat.attempt_load is e.attempt_load\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
