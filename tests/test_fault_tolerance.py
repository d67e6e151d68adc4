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
from qat_testkit import IMGSZ, tiny_run_inputs  # noqa: E402

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


def _snapshot(folder):
    """{file: bytes} under folder, label caches aside (a scan may write them)."""
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".cache"}


def test_bad_input_sweep_issue16(tiny, tmp_path):
    """Issue 16: each case is one `error:` line with exit status 2, and nothing under the working
    folder is written, half-written or replaced (an existing export keeps its bytes, no run folder).
    A process each (~10 s here), so one case per kind: every flag range is checked in-process in
    tests/utils/test_cli.py, the yaml schemas in tests/utils/test_general.py and tests/models/test_yolo.py,
    --hyp and --freeze in tests/test_train.py and tests/test_train_qat.py."""
    import torch

    from qat_testkit import save_fp32_checkpoint
    w, data = tiny["weights"], tiny["data"]
    d = yaml.safe_load(Path(data).read_text())
    R = ROOT
    # inputs
    (tmp_path / "six.yaml").write_text(yaml.safe_dump({**d, "nc": "six"}))
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({**d, "nc": 3, "names": ["a", "b", "c"]}))
    (tmp_path / "expr.yaml").write_text("nc: 2\nbackbone: [[-1, 1, Conv, [2*nc, 3, 2]]]\nhead: []\n")
    train_run = tmp_path / "train-run"
    last = save_fp32_checkpoint(train_run / "weights" / "last.pt")
    (train_run / "opt.yaml").write_text("epochs: 300\n")
    from export import export_onnx
    from models.experimental import attempt_load
    plain = tmp_path / "plain.onnx"  # an FP32 export, marked as such (val_trt then needs no Q/DQ in it)
    export_onnx(attempt_load(w), plain, IMGSZ)
    import onnx
    m = onnx.load(str(plain))
    m.metadata_props.add(key="qat", value="0")
    onnx.save(m, str(plain))
    damaged = tmp_path / "damaged.pt"  # a QAT checkpoint whose settings became a string
    from qat.calibrate import calibrate
    from qat.checkpoint import save_qat
    from qat.quantize import quantize_model
    from qat.settings import QuantSettings
    from qat_testkit import fp32_model, noise_images
    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    calibrate(q, [noise_images(2, seed=3)], show=False)
    save_qat(damaged, q, QuantSettings())
    ckpt = torch.load(damaged, weights_only=False)
    ckpt["qat"]["settings"] = "max"
    torch.save(ckpt, damaged)
    (tmp_path / "damaged.onnx").write_bytes(b"the previous good export")
    out_dir = tmp_path / "out-dir"
    out_dir.mkdir()
    runs = ["--project", tmp_path / "runs", "--name", "x"]
    cases = [
        ([R / "train_qat.py", "--weights", w, "--data", tmp_path / "six.yaml", *runs], "nc must be the number"),
        ([R / "train_qat.py", "--resume", last, "--device", "cpu"], "not a QAT checkpoint"),
        ([R / "export_qat.py", "--weights", damaged], "'qat.settings' is 'max'"),
        ([R / "export.py", "--weights", w, "--opset", "5"], "--opset"),
        ([R / "val.py", "--weights", w, "--data", data, "--conf-thres", "2", *runs], "--conf-thres"),
        ([R / "val_trt.py", "--onnx", plain, "--data", three, "--backend", "onnxruntime", *runs],
         "predicts 6 classes but the data yaml has 3"),
        ([R / "train.py", "--weights", w, "--data", data, "--freeze", "999", "--device", "cpu", "--workers", "0",
          "--imgsz", str(IMGSZ), *runs], "--freeze 999"),
        ([R / "train.py", "--cfg", tmp_path / "expr.yaml", "--data", data, "--device", "cpu", *runs], "not a literal"),
        ([R / "tools/reparameterize.py", "--weights", w, "--out", out_dir], "is a folder"),
    ]
    for cmd, expected in cases:
        before = _snapshot(tmp_path)
        line = _one_error_line(cmd, tmp_path)
        assert expected.lower() in line.lower(), (cmd, line)
        assert _snapshot(tmp_path) == before, (cmd, sorted(set(_snapshot(tmp_path)) ^ set(before)))
        assert not (tmp_path / "runs").exists(), cmd  # no empty run folder left behind


def test_out_of_range_classes_are_skipped_in_every_split(tiny, tmp_path):
    """Issue 16.3: labels of class >= nc (7 with 6 classes, and 1e10) in train and val: val.py
    evaluates, and train_qat.py --loss det trains, evaluates and writes its checkpoints."""
    import train_qat
    import val as validate
    from utils.demo_data import generate

    root = tmp_path / "data"
    data = generate(root, n_train=8, n_val=4, imgsz=96)  # the tiny data again (deterministic), to change here
    for split in ("train", "val"):
        f = sorted((root / "labels" / split).glob("*.txt"))[0]
        f.write_text(f.read_text() + "7 0.5 0.5 0.2 0.2\n1e10 0.3 0.3 0.1 0.1\n")
    r = validate.run(str(data), weights=tiny["weights"], batch_size=2, imgsz=IMGSZ, device="cpu", workers=0,
                     project=str(tmp_path / "runs"), plots=False, return_dict=True)
    assert 0.0 <= r["map"] <= 1.0
    out = train_qat.run_api(weights=tiny["weights"], data=str(data), imgsz=IMGSZ, batch_size=2, calib_batches=1,
                            epochs=1, iters_per_epoch=1, loss="det", device="cpu", workers=0, val_batches=1,
                            project=str(tmp_path / "runs"), name="det", no_eval_origin=True)
    assert out["best"].is_file() and out["last"].is_file() and "QAT" in out["rows"]
