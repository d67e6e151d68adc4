"""Issue 6: a SIGKILLed train_qat.py resumes and finishes, and a bad-input sweep over every command
(each a one-line `error:` on stderr and exit status 2, as a user sees it: real subprocesses)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "qat"))
from qat_models import IMGSZ, tiny_run_inputs  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("fault"))


def _qat_cmd(tiny, *extra):
    return [sys.executable, str(ROOT / "train_qat.py"), "--weights", tiny["weights"], "--data", tiny["data"],
            "--imgsz", str(IMGSZ), "--batch-size", "2", "--calib-batches", "1", "--device", "cpu", "--workers", "0",
            "--project", str(tiny["root"] / "runs"), "--name", "killed", "--exist-ok", *extra]


def test_sigkill_mid_epoch_then_resume(tiny):
    """Kill -9 after the first mid-epoch checkpoint: qat_last.pt is complete (it loads), and --resume
    finishes the run from it."""
    from qat.checkpoint import is_qat_checkpoint
    from qat.compat import load_checkpoint

    last = tiny["root"] / "runs/killed/weights/qat_last.pt"
    p = subprocess.Popen(_qat_cmd(tiny, "--epochs", "2", "--iters-per-epoch", "40", "--save-period", "2",
                                  "--no-eval-origin", "--no-eval-ptq"),
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not last.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no mid-epoch qat_last.pt was written"
        time.sleep(0.5)  # let it get into the next iterations (and maybe the next save)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(last)
    assert is_qat_checkpoint(ckpt)
    killed_at = (ckpt["epoch"], ckpt["iteration"])
    assert killed_at < (2, 0), killed_at

    r = subprocess.run([sys.executable, str(ROOT / "train_qat.py"), "--resume", str(last), "--device", "cpu",
                        "--workers", "0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((last.parents[1] / "report.json").read_text())
    assert [row["model"] for row in report][-1] == "QAT"
    done = load_checkpoint(last)
    assert (done["epoch"], done["iteration"]) > killed_at


def _one_error_line(cmd, tmp_path):
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


def test_bad_input_sweep(tiny, tmp_path):
    """Every command, each kind of bad input: one `error:` line naming the problem, exit status 2."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(tiny["weights"]).read_bytes()[:5000])  # truncated
    no_qdq = tmp_path / "plain.onnx"
    from export import export_onnx
    from models.experimental import attempt_load

    export_onnx(attempt_load(tiny["weights"]), no_qdq, IMGSZ)
    wrong_data = tmp_path / "wrong.yaml"
    wrong_data.write_text(yaml.safe_dump({"path": str(tmp_path / "nowhere"), "train": "images", "val": "images",
                                          "names": ["a"]}))
    three = tmp_path / "three.yaml"
    d = yaml.safe_load(Path(tiny["data"]).read_text())
    three.write_text(yaml.safe_dump({**d, "nc": 3, "names": ["a", "b", "c"]}))
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    w, data = tiny["weights"], tiny["data"]
    R = ROOT
    cases = [
        ([R / "train_qat.py", "--weights", tmp_path / "missing.pt", "--data", data], "not found"),
        ([R / "train_qat.py", "--weights", corrupt, "--data", data], "checkpoint"),
        ([R / "train_qat.py", "--weights", w, "--data", wrong_data], "not found"),
        ([R / "train_qat.py", "--weights", w, "--data", three], "classes"),
        ([R / "train_qat.py", "--weights", w, "--data", data, "--imgsz", "100"], "multiple"),
        ([R / "train_qat.py", "--weights", w, "--data", data, "--imgsz", str(IMGSZ), "--project", blocker,
          "--epochs", "0", "--calib-batches", "1", "--no-eval-origin", "--no-eval-ptq", "--device", "cpu",
          "--workers", "0"], ""),
        ([R / "export_qat.py", "--weights", tmp_path / "missing.pt"], "not found"),
        ([R / "export_qat.py", "--weights", corrupt], "checkpoint"),
        ([R / "export_qat.py", "--weights", w, "--imgsz", "100"], "multiple"),
        ([R / "val_trt.py", "--onnx", no_qdq, "--data", data, "--weights", tmp_path / "missing.pt"], ""),
        ([R / "val_trt.py", "--onnx", no_qdq, "--data", data, "--backend", "tensorflow"], "backend"),
        ([R / "val_trt.py", "--onnx", tmp_path / "missing.onnx", "--data", data], "not found"),
        ([R / "val.py", "--weights", corrupt, "--data", data], "checkpoint"),
        ([R / "export.py", "--weights", no_qdq], "ONNX"),
        ([R / "train.py", "--weights", w, "--data", wrong_data, "--cfg", "gelan-t.yaml"], "not found"),
        ([R / "tools/reparameterize.py", "--weights", tmp_path / "missing.pt"], "not found"),
    ]
    for cmd, expected in cases:
        line = _one_error_line(cmd, tmp_path)
        assert expected.lower() in line.lower(), (cmd, line)
