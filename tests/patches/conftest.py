"""Fixtures for the installer tests: an upstream-layout YOLOv9 checkout built from the PyPI `yolo9`
package (upstream's tree repackaged under `yolo9/`), and a small yolov9-qat source tree.

The `yolo9` package is only read here (found with find_spec, never imported): its files are laid
out as upstream's clone and its `yolo9.` imports rewritten to upstream's (`from models...`)."""
import importlib.util
import re
import shutil
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_IMPORT = re.compile(r"^(\s*(?:from|import)\s+)yolo9\.", re.M)
# yolo9 1.0.18 changed upstream's NMS input selection to prediction[0][0] (dual heads only); the clone
# (WongKinYiu/yolov9 5b1ea9a, utils/general.py) has prediction[0], which single-head GELANs need.
_NMS_YOLO9 = "prediction = prediction[0][0]  # select only inference output"
_NMS_UPSTREAM = "prediction = prediction[0]  # select only inference output"


def _yolo9_root():
    spec = importlib.util.find_spec("yolo9")
    if spec is None or not spec.origin:
        pytest.skip("test-only peer 'yolo9' is not installed (pip install --no-deps yolo9)")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def upstream_pristine(tmp_path_factory):
    """Upstream's tree as a clone has it: train.py, val.py, models/, utils/, data/ ... at the top."""
    src = _yolo9_root()
    dst = tmp_path_factory.mktemp("upstream") / "yolov9"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dst / "__init__.py").unlink()  # the package wrapper; upstream's root is not a package
    for f in dst.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        new = _IMPORT.sub(r"\1", text)
        if new != text:
            f.write_text(new, encoding="utf-8")
    assert "from models.yolo import Model" in (dst / "train.py").read_text(encoding="utf-8")
    general = dst / "utils" / "general.py"
    text = general.read_text(encoding="utf-8")
    assert text.count(_NMS_YOLO9) == 1
    general.write_text(text.replace(_NMS_YOLO9, _NMS_UPSTREAM), encoding="utf-8")
    return dst


@pytest.fixture
def upstream(upstream_pristine, tmp_path):
    """A fresh copy of the upstream checkout for one test."""
    dst = tmp_path / "yolov9"
    shutil.copytree(upstream_pristine, dst)
    return dst


INSTALLED_DATA = ("data/hyps/hyp.qat.yaml", "data/demo.yaml", "weights/demo-gelan.pt")  # install.py INSTALL_DATA

FAKE_TOOLS = {
    # qat/pipeline.py records what train.py's hook hands over, so a test can check the contract
    "qat/__init__.py": '"""Stand-in for yolov9-qat\'s qat package (installer tests)."""\n',
    "qat/pipeline.py": """
        CALLS = []


        def run_from_train(model, opt, hyp, data_dict, device):
            CALLS.append(dict(model=model, opt=opt, hyp=hyp, data_dict=data_dict, device=device))
            return ("qat", model)
        """,
    "qat/stages/__init__.py": "",
    "qat/stages/rules.yaml": "groups: []\n",
    "train_qat.py": """
        import argparse

        from models.yolo import DetectionModel  # noqa: F401  (upstream has it)
        from qat.compat import UserError, run_cli
        from utils.general import LOGGER
        from utils.qat_fake_helper import helper_value
        import val as validate


        def main():
            if validate.run is None:
                raise UserError("no val.run")
            LOGGER.info(helper_value())


        if __name__ == "__main__":
            run_cli(main)
        """,
    "export_qat.py": "from qat.compat import run_cli  # noqa: F401\n",
    "val_trt.py": "from utils.torch_utils import select_device  # noqa: F401\n",
    # one of our helper modules that upstream lacks under that name: the installer must copy it
    "utils/qat_fake_helper.py": """
        def helper_value():
            return 42
        """,
}


@pytest.fixture
def fake_source(tmp_path):
    """A yolov9-qat checkout in miniature: the real installer, qat/compat.py (with the helpers it
    imports), requirements.txt and default data files; stand-in tools."""
    root = tmp_path / "yolov9-qat"
    (root / "patches").mkdir(parents=True)
    shutil.copy2(REPO / "patches" / "install.py", root / "patches" / "install.py")
    for rel, text in FAKE_TOOLS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    for rel in ("qat/compat.py", "qat/upstream_env.py", "utils/safe_unpickle.py", "requirements.txt",
                *INSTALLED_DATA):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    return root
