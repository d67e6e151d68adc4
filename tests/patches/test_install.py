"""patches/install.py against an upstream-layout YOLOv9 checkout built from the `yolo9` package.

Upstream's train.py imports pandas, seaborn, tensorboard, ... which this project does not install,
so the hooks are exercised by compiling train.py and running its own `parse_opt` and `train`
functions (taken out with `ast`) against stand-ins for upstream's helpers. Where upstream's
dependencies are installed, `python train.py --help` and a real `train.py --qat` run are checked too.
"""
import argparse
import ast
import builtins
import contextlib
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


REPO = Path(__file__).resolve().parents[2]
INSTALL_ITEMS = ["qat", "train_qat.py", "export_qat.py", "val_trt.py"]
INSTALL_DATA = ["data/hyps/hyp.qat.yaml", "data/demo.yaml", "weights/demo-gelan.pt"]  # the tools' defaults
# what upstream train.py imports beyond our requirements (gitpython and thop are imported lazily or optionally)
UPSTREAM_DEPS = ("pandas", "seaborn", "IPython", "psutil", "tensorboard")


def run_installer(source, target, *args):
    r = subprocess.run([sys.executable, str(source / "patches" / "install.py"), str(target), *args],
                       capture_output=True, text=True, timeout=60)
    return r


def snapshot(root):
    """{relative path: sha256} of every file, plus every folder (value None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


class _Stubs(dict):
    """Globals for a function lifted out of upstream's train.py: builtins stay builtins, every
    other unknown name (upstream's helpers) becomes a fresh stand-in."""

    def __missing__(self, key):
        if hasattr(builtins, key):
            return getattr(builtins, key)
        from unittest.mock import MagicMock
        self[key] = MagicMock(name=key)
        return self[key]


def lift(path, name, **real):
    """Function `name` of the file at `path`, compiled alone with `real` + stand-in globals."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert len(fn) == 1, f"{name}() not found in {path}"
    g = _Stubs(real)
    exec(compile(ast.Module(body=fn, type_ignores=[]), str(path), "exec"), g)
    return g[name]


@contextlib.contextmanager
def importable_from(root):
    """Import `qat` from `root` (not this repository's qat/) for the duration."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "qat" or k.startswith("qat.")}
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "qat" or k.startswith("qat.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture
def installed(fake_source, upstream):
    before = snapshot(upstream)
    r = run_installer(fake_source, upstream)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(source=fake_source, target=upstream, before=before, out=r.stdout)


# --------------------------------------------------------------------------------------------------


def test_install_copies_tools_and_hooks_train(installed):
    src, dst = installed.source, installed.target
    shipped = [p.relative_to(src) for item in INSTALL_ITEMS + INSTALL_DATA
               for p in [src / item, *(src / item).rglob("*")] if p.is_file()]
    assert len(shipped) == 12
    for rel in shipped:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    # a helper module of ours that upstream's utils/ lacks comes along; upstream's own stay untouched
    assert (dst / "utils" / "qat_fake_helper.py").is_file() and (dst / "utils" / "safe_unpickle.py").is_file()
    # our packages, pinned as in requirements.txt, for the clone's environment
    assert (dst / "requirements-qat.txt").read_bytes().endswith((src / "requirements.txt").read_bytes())
    changed = {k for k, v in snapshot(dst).items() if k in installed.before and installed.before[k] != v}
    assert changed == {"train.py"}

    text = (dst / "train.py").read_text(encoding="utf-8")
    original = (dst / "train.py.orig-yolov9qat").read_text(encoding="utf-8")
    assert hashlib.sha256(original.encode()).hexdigest() == installed.before["train.py"]
    compile(text, "train.py", "exec")
    added = [line for line in text.splitlines() if "# yolov9-qat" in line]
    assert len(added) == 4 and len(text.splitlines()) == len(original.splitlines()) + 4
    # the option sits right after --resume, the hand-off right before check_amp, inside train()
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "'--resume'" in line)
    assert "'--qat'" in lines[i + 1]
    j = next(i for i, line in enumerate(lines) if "amp = check_amp(model)" in line)
    assert lines[j - 3].strip().startswith("if getattr(opt, 'qat', False):")
    assert lines[j - 1].strip().startswith("return run_from_train(model,")
    manifest = json.loads((dst / ".yolov9-qat-install.json").read_text())
    assert "utils/qat_fake_helper.py" in manifest["helpers"] and "qat/stages/rules.yaml" in manifest["files"]
    assert "installed yolov9-qat" in installed.out


def test_patched_parse_opt_has_qat(installed, monkeypatch, capsys):
    parse_opt = lift(installed.target / "train.py", "parse_opt", argparse=argparse, ROOT=Path("."))
    monkeypatch.setattr(sys, "argv", ["train.py", "--qat", "--epochs", "3"])
    opt = parse_opt(True)
    assert opt.qat is True and opt.epochs == 3
    monkeypatch.setattr(sys, "argv", ["train.py"])
    assert parse_opt(True).qat is False
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit) as e:
        parse_opt()
    assert e.value.code == 0
    assert "--qat" in capsys.readouterr().out


class _ReachedCheckAmp(Exception):
    pass


def test_patched_train_hands_loaded_model_to_qat_pipeline(installed, tmp_path):
    """Run upstream's own train() up to the hook; only its helpers are stand-ins."""
    data = {"train": "images/train", "val": "images/val", "nc": 2, "names": ["a", "b"]}

    class Model:
        def __init__(self, cfg, ch=3, nc=None, anchors=None):
            self.cfg, self.nc = cfg, nc

        def to(self, device):
            return self

    def check_amp(model):
        raise _ReachedCheckAmp

    train = lift(installed.target / "train.py", "train", Path=Path, RANK=-1, LOCAL_RANK=-1, WORLD_SIZE=1,
                 Model=Model, check_amp=check_amp, methods=lambda obj: [],
                 Loggers=lambda *a, **k: SimpleNamespace(remote_dataset=data),
                 torch_distributed_zero_first=lambda rank: contextlib.nullcontext())
    device = SimpleNamespace(type="cpu")

    def opt(qat):
        return argparse.Namespace(save_dir=str(tmp_path / "run"), epochs=1, batch_size=2, weights="", single_cls=False,
                                  evolve=None, data="d.yaml", cfg="gelan-t.yaml", resume=False, noval=False,
                                  nosave=False, workers=0, freeze=[0], seed=0, noplots=True, qat=qat)

    with importable_from(installed.target):
        pipeline = __import__("qat.pipeline", fromlist=["CALLS"])
        result = train({"lr0": 0.01}, opt(True), device, callbacks=SimpleNamespace(run=lambda *a: None))
        assert len(pipeline.CALLS) == 1
        call = pipeline.CALLS[0]
        assert isinstance(call["model"], Model) and call["model"].nc == 2 and call["model"].cfg == "gelan-t.yaml"
        assert call["data_dict"] is data and call["device"] is device and call["hyp"]["lr0"] == 0.01
        assert call["opt"].qat is True and result == ("qat", call["model"])
        # without --qat (and with an opt.yaml from before the install: no `qat` at all) upstream goes on
        for o in (opt(False), argparse.Namespace(**{k: v for k, v in vars(opt(False)).items() if k != "qat"})):
            with pytest.raises(_ReachedCheckAmp):
                train({"lr0": 0.01}, o, device, callbacks=SimpleNamespace(run=lambda *a: None))
        assert len(pipeline.CALLS) == 1


def test_second_install_changes_nothing(installed):
    before = snapshot(installed.target)
    mtimes = {p: p.stat().st_mtime_ns for p in installed.target.rglob("*")}
    r = run_installer(installed.source, installed.target)
    assert r.returncode == 0, r.stderr
    assert "already installed" in r.stdout and "nothing changed" in r.stdout
    assert snapshot(installed.target) == before
    assert {p: p.stat().st_mtime_ns for p in installed.target.rglob("*")} == mtimes


def test_uninstall_restores_original_checkout_exactly(installed):
    # what running the tools leaves behind must go too
    cache = installed.target / "qat" / "__pycache__"
    cache.mkdir()
    (cache / "pipeline.cpython-311.pyc").write_bytes(b"\0")
    r = run_installer(installed.source, installed.target, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert snapshot(installed.target) == installed.before
    r = run_installer(installed.source, installed.target, "--uninstall")
    assert r.returncode == 0 and "not installed" in r.stdout


def test_dry_run_shows_changes_and_changes_nothing(fake_source, upstream):
    before = snapshot(upstream)
    r = run_installer(fake_source, upstream, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would copy qat/pipeline.py" in r.stdout and "would copy utils/qat_fake_helper.py" in r.stdout
    assert "+    parser.add_argument('--qat'" in r.stdout
    assert "+        from qat.pipeline import run_from_train" in r.stdout
    assert snapshot(upstream) == before
    run_installer(fake_source, upstream)
    installed = snapshot(upstream)
    r = run_installer(fake_source, upstream, "--uninstall", "--dry-run")
    assert r.returncode == 0 and "would restore train.py" in r.stdout
    assert snapshot(upstream) == installed


@pytest.mark.parametrize("anchor", ["    amp = check_amp(model)  # check AMP\n",
                                    "    parser.add_argument('--resume', nargs='?', const=True, default=False, "
                                    "help='resume most recent training')\n"])
def test_missing_anchor_refuses_and_changes_nothing(fake_source, upstream, anchor):
    train = upstream / "train.py"
    text = train.read_text(encoding="utf-8")
    assert text.count(anchor) == 1
    train.write_text(text.replace(anchor, ""), encoding="utf-8")
    before = snapshot(upstream)
    r = run_installer(fake_source, upstream)
    assert_one_line_error(r, "anchor", "not found", "nothing was changed")
    assert snapshot(upstream) == before


def test_duplicate_anchor_refuses(fake_source, upstream):
    train = upstream / "train.py"
    anchor = "    amp = check_amp(model)  # check AMP\n"
    train.write_text(train.read_text(encoding="utf-8").replace(anchor, anchor * 2), encoding="utf-8")
    before = snapshot(upstream)
    assert_one_line_error(run_installer(fake_source, upstream), "found 2 times")
    assert snapshot(upstream) == before


def test_refuses_what_is_not_an_upstream_checkout(fake_source, upstream, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_installer(fake_source, empty), "not a YOLOv9 checkout")
    assert_one_line_error(run_installer(fake_source, tmp_path / "nope"), "not a folder")
    assert_one_line_error(run_installer(fake_source, fake_source), "yolov9-qat checkout itself")
    # the PyPI package's own layout (imports yolo9.*) is not a clone
    train = upstream / "train.py"
    text = train.read_text(encoding="utf-8")
    train.write_text(text.replace("from models.yolo import", "from yolo9.models.yolo import"), encoding="utf-8")
    before = snapshot(upstream)
    assert_one_line_error(run_installer(fake_source, upstream), "yolo9")
    assert snapshot(upstream) == before
    assert not list(empty.iterdir())


def test_refuses_tools_that_need_names_upstream_lacks(fake_source, upstream):
    (fake_source / "val_trt.py").write_text("from utils.general import UserError\nfrom export import export_onnx\n"
                                            "import utils.demo_nowhere\nimport val\nval.nothing_like_this()\n"
                                            "from models.experimental import attempt_load\n")
    before = snapshot(upstream)
    r = run_installer(fake_source, upstream)
    assert_one_line_error(r, "val_trt.py:1 uses utils.general.UserError", "val_trt.py:2 uses export.export_onnx",
                          "utils.demo_nowhere", "val_trt.py:5 uses val.nothing_like_this",
                          "val_trt.py:6 uses models.experimental.attempt_load")
    assert snapshot(upstream) == before
    # the same import as an optional fallback is fine
    (fake_source / "val_trt.py").write_text("try:\n    from utils.general import UserError\nexcept ImportError:\n"
                                            "    UserError = ValueError\n")
    assert run_installer(fake_source, upstream).returncode == 0


def test_refuses_when_the_qat_pipeline_lacks_the_hook_function(fake_source, upstream):
    before = snapshot(upstream)
    (fake_source / "qat" / "pipeline.py").write_text("def run_from_train(model, opt):\n    pass\n")
    assert_one_line_error(run_installer(fake_source, upstream), "must take (model, opt=, hyp=, data_dict=, device=)")
    (fake_source / "qat" / "pipeline.py").write_text("def run(model, **kw):\n    pass\n")
    assert_one_line_error(run_installer(fake_source, upstream), "defines no run_from_train()")
    assert snapshot(upstream) == before


def test_existing_qat_folder_is_not_overwritten(fake_source, upstream):
    (upstream / "qat").mkdir()
    (upstream / "qat" / "mine.py").write_text("x = 1\n")
    before = snapshot(upstream)
    assert_one_line_error(run_installer(fake_source, upstream), "already exists", "not installed by this tool")
    assert snapshot(upstream) == before


def test_reinstall_updates_changed_tools_and_guards_edits(installed):
    src, dst = installed.source, installed.target
    (src / "qat" / "stages" / "rules.yaml").write_text("groups: [1]\n")
    (src / "qat" / "new_stage.py").write_text("Y = 2\n")
    (src / "export_qat.py").unlink()
    (src / "export_qat.py").write_text("from qat.compat import UserError  # noqa: F401\n")
    r = run_installer(src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "qat" / "stages" / "rules.yaml").read_text() == "groups: [1]\n"
    assert (dst / "qat" / "new_stage.py").is_file()
    # an installed file the user edited is not overwritten silently
    (dst / "val_trt.py").write_text("# my change\n")
    (src / "val_trt.py").write_text("from utils.general import LOGGER  # noqa: F401\n")
    before = snapshot(dst)
    assert_one_line_error(run_installer(src, dst), "val_trt.py was edited", "--force")
    assert snapshot(dst) == before
    assert run_installer(src, dst, "--force").returncode == 0
    assert (dst / "val_trt.py").read_text() == (src / "val_trt.py").read_text()
    assert run_installer(src, dst, "--uninstall").returncode == 0
    assert snapshot(dst) == installed.before


def test_uninstall_keeps_later_user_edits_of_train_py(installed):
    train = installed.target / "train.py"
    text = train.read_text(encoding="utf-8")
    train.write_text(text.replace("GIT_INFO = None", "GIT_INFO = None  # my edit"), encoding="utf-8")
    r = run_installer(installed.source, installed.target, "--uninstall")
    assert r.returncode == 0, r.stderr
    restored = train.read_text(encoding="utf-8")
    assert "# my edit" in restored and "yolov9-qat" not in restored
    assert hashlib.sha256(restored.replace("  # my edit", "").encode()).hexdigest() == installed.before["train.py"]
    assert not (installed.target / "qat").exists() and not (installed.target / ".yolov9-qat-install.json").exists()


def test_crlf_train_py_keeps_its_line_endings(fake_source, upstream):
    train = upstream / "train.py"
    crlf = train.read_bytes().replace(b"\n", b"\r\n")
    train.write_bytes(crlf)
    assert run_installer(fake_source, upstream).returncode == 0
    patched = train.read_bytes()
    assert b"yolov9-qat\r\n" in patched and patched.count(b"\n") == patched.count(b"\r\n")
    assert run_installer(fake_source, upstream, "--uninstall").returncode == 0
    assert train.read_bytes() == crlf


def _missing_upstream_deps():
    return [m for m in UPSTREAM_DEPS if importlib.util.find_spec(m) is None]


def test_upstream_train_help_lists_qat(installed):
    missing = _missing_upstream_deps()
    if missing:
        pytest.skip(f"upstream train.py needs {', '.join(missing)} (not installed); hooks checked via ast above")
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=installed.target, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--qat" in r.stdout


def test_upstream_train_qat_runs_the_hook(installed, tmp_path):
    """The real upstream train.py, end to end up to the hand-off (the stand-in pipeline prints)."""
    missing = _missing_upstream_deps()
    if missing:
        pytest.skip(f"upstream train.py needs {', '.join(missing)} (not installed); hooks checked via ast above")
    import cv2
    import numpy as np
    for split in ("train", "val"):
        (tmp_path / "data" / "images" / split).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "data" / "images" / split / "a.jpg"), np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "data" / "d.yaml").write_text(f"path: {tmp_path / 'data'}\ntrain: images/train\nval: images/val\n"
                                              f"nc: 2\nnames: [a, b]\n")
    (installed.target / "qat" / "pipeline.py").write_text(
        "def run_from_train(model, opt, hyp, data_dict, device):\n"
        "    print(f'QAT-HOOK {type(model).__name__} nc={data_dict[\"nc\"]} qat={opt.qat}')\n"
        "    return (0,) * 7\n")
    hyp = next((installed.target / "data" / "hyps").glob("*.yaml"))
    r = subprocess.run([sys.executable, "train.py", "--qat", "--cfg", "models/detect/gelan-t.yaml", "--data",
                        str(tmp_path / "data" / "d.yaml"), "--hyp", str(hyp), "--device", "cpu", "--epochs", "1",
                        "--project", str(tmp_path / "runs"), "--name", "t"],
                       cwd=installed.target, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "QAT-HOOK DetectionModel nc=2 qat=True" in r.stdout


def test_installs_this_repository_into_upstream(upstream):
    """The real qat/ and tools of this checkout: every name they import exists upstream (or comes
    from qat.compat), and uninstall undoes it exactly."""
    missing = [i for i in INSTALL_ITEMS if not (REPO / i).exists()]
    if missing:
        pytest.skip(f"this checkout has no {', '.join(missing)} yet")
    before = snapshot(upstream)
    r = run_installer(REPO, upstream)
    assert r.returncode == 0, r.stderr
    assert (upstream / "qat" / "compat.py").is_file()
    for f in upstream.rglob("*.py"):
        compile(f.read_text(encoding="utf-8"), str(f), "exec")
    r = run_installer(REPO, upstream, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert snapshot(upstream) == before


def _load_installer(source):
    spec = importlib.util.spec_from_file_location("yolov9qat_install_under_test", source / "patches" / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _install_cut_short(source, target, monkeypatch, fail_under="utils"):
    """Run the installer in-process; its first write into `fail_under` fails (a read-only utils/)."""
    mod = _load_installer(source)
    real = mod.write_atomic

    def failing(path, data, mode_from=None):
        if Path(path).relative_to(target).parts[0] == fail_under:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data, mode_from)

    monkeypatch.setattr(mod, "write_atomic", failing)
    assert mod.main([str(target)]) == 2
    assert (target / ".yolov9-qat-install.json").is_file()  # the record was written first


@pytest.mark.parametrize("then", ["rerun", "uninstall"])
def test_install_cut_short_is_completed_or_rolled_back(fake_source, upstream, monkeypatch, then):
    """issue 16.8: an install that failed half-way (read-only utils/) is finished by a rerun, or undone."""
    before = snapshot(upstream)
    _install_cut_short(fake_source, upstream, monkeypatch)
    assert (upstream / "train.py").read_bytes() == (upstream / "train.py.orig-yolov9qat").read_bytes()  # not patched
    if then == "rerun":
        r = run_installer(fake_source, upstream)
        assert r.returncode == 0, r.stderr
        assert "installed yolov9-qat" in r.stdout and "# yolov9-qat" in (upstream / "train.py").read_text()
        assert (upstream / "utils" / "qat_fake_helper.py").is_file()
        assert "previous" not in json.loads((upstream / ".yolov9-qat-install.json").read_text())
        r = run_installer(fake_source, upstream)
        assert r.returncode == 0 and "nothing changed" in r.stdout
    r = run_installer(fake_source, upstream, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert snapshot(upstream) == before


def test_update_cut_short_is_completed(installed, monkeypatch):
    """An update of installed files that stops half-way leaves files at the earlier version: still ours."""
    src, dst = installed.source, installed.target
    (src / "qat" / "pipeline.py").write_text((src / "qat" / "pipeline.py").read_text() + "\n# v2\n")
    (src / "utils" / "qat_fake_helper.py").write_text("def helper_value():\n    return 43\n")
    _install_cut_short(src, dst, monkeypatch)
    r = run_installer(src, dst)
    assert r.returncode == 0, r.stderr
    assert (dst / "utils" / "qat_fake_helper.py").read_text().endswith("return 43\n")
    assert run_installer(src, dst, "--uninstall").returncode == 0
    assert snapshot(dst) == installed.before
