"""train_qat.py end to end on tiny generated data (thin gelan-t, 64 px): artifacts and report, PTQ
only, a killed run resumed, the sensitivity command, bad input as one-line errors, torchrun with
two CPU processes (gloo), and train.py --qat."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train_qat
from qat.checkpoint import is_qat_checkpoint, load_qat
from qat.compat import UserError, load_checkpoint
from qat.finetune import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "qat"))
from qat_testkit import IMGSZ, interrupt_step_at, tiny_run_inputs  # noqa: E402

FAST = dict(imgsz=IMGSZ, batch_size=2, calib_batches=2, iters_per_epoch=2, device="cpu", workers=0, exist_ok=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("qat_e2e"))


def _run(tiny, name, **kw):
    base = dict(weights=tiny["weights"], data=tiny["data"], project=str(tiny["root"] / "runs"), name=name, **FAST)
    return train_qat.run_api(**{**base, **kw})


def _acts(state):
    return {k: float(v) for k, v in state.items() if v.numel() == 1}


def test_qat_run_killed_and_resumed(tiny, monkeypatch):
    step = interrupt_step_at(monkeypatch, 3)  # Ctrl-C in epoch 2
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, "qat", epochs=2)
    monkeypatch.setattr(Trainer, "step", step)
    run_dir = tiny["root"] / "runs" / "qat"
    last = run_dir / "weights" / "qat_last.pt"
    ckpt = load_checkpoint(last)
    assert is_qat_checkpoint(ckpt) and (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    for f in ("opt.yaml", "calibration.md", "calibration.json", "weights/qat_best.pt"):
        assert (run_dir / f).is_file(), f

    out = train_qat.run_api(resume=str(last), device="cpu", workers=0)
    assert out["save_dir"] == run_dir and [h["epoch"] for h in out["history"]] == [1, 2]
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["model"] for r in report] == ["FP32", "PTQ", "QAT"]
    assert all("d_map" in r for r in report) and report[0]["d_map"] == 0.0
    assert "| QAT |" in (run_dir / "report.md").read_text()
    model, settings, best = load_qat(run_dir / "weights" / "qat_best.pt")
    assert settings.weight_bits == 8 and best["opt"]["imgsz"] == IMGSZ
    # qat_best.pt is the PTQ model unless a QAT epoch beat its mAP50-95, and the report says which
    ptq, qat = report[1]["map"], max(h["map"] for h in out["history"])
    assert best["epoch"] == (0 if qat <= ptq else next(h["epoch"] for h in out["history"] if h["map"] == qat))
    assert best["best_fitness"] == pytest.approx(max(ptq, qat))
    assert ("qat_best.pt: QAT epoch" if best["epoch"] else "qat_best.pt: the PTQ") in (run_dir / "report.md").read_text()
    with pytest.raises(UserError, match="already finished"):
        train_qat.run_api(resume=str(last), device="cpu", workers=0)


def test_ptq_only_and_torchrun(tiny):
    """--epochs 0 saves the calibrated model as qat_best.pt; torchrun with 2 gloo processes runs a
    QAT epoch, and its merged calibration equals one process calibrating on all the same images."""
    out = _run(tiny, "ptq", epochs=0, no_eval_origin=True, batch_size=4, calib_batches=4)
    best = out["save_dir"] / "weights" / "qat_best.pt"
    ckpt = load_checkpoint(best)
    assert is_qat_checkpoint(ckpt) and ckpt["epoch"] == 0 and out["history"] == []
    assert [r["model"] for r in json.loads((out["save_dir"] / "report.json").read_text())] == ["PTQ"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: other tests may run torchrun at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train_qat.py"), "--weights", tiny["weights"], "--data", tiny["data"], "--imgsz", str(IMGSZ),
           "--batch-size", "4", "--calib-batches", "4", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu",
           "--workers", "0", "--project", str(tiny["root"] / "runs"), "--name", "ddp", "--exist-ok",
           "--no-learn-ranges"]  # the calibrated amaxes stay as merged, to compare below
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp_dir = tiny["root"] / "runs" / "ddp"
    ddp = load_checkpoint(ddp_dir / "weights" / "qat_last.pt")
    assert ddp["epoch"] == 1 and len(ddp["history"]) == 1 and "map" in ddp["history"][0]
    assert [r["model"] for r in json.loads((ddp_dir / "report.json").read_text())] == ["FP32", "PTQ", "QAT"]
    a, b = _acts(ddp["qat"]["quantizer_state"]), _acts(ckpt["qat"]["quantizer_state"])
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_sensitivity_command(tiny):
    out = train_qat.run_api(command="sensitive", weights=tiny["weights"], data=tiny["data"],
                            project=str(tiny["root"] / "runs"), name="sens", auto_skip=0.0, val_batches=1,
                            **{k: v for k, v in FAST.items() if k != "iters_per_epoch"})
    ranked = out["ranked"]
    assert len(ranked) == 23 and all({"layer", "type", "map", "gain"} <= r.keys() for r in ranked)
    assert [r["gain"] for r in ranked] == sorted((r["gain"] for r in ranked), reverse=True)
    assert out["auto_skip"]["budget"] == 0.0
    sens = json.loads((out["save_dir"] / "sensitivity.json").read_text())
    assert sens["layers"] == ranked and "auto-skip" in (out["save_dir"] / "sensitivity.md").read_text()


def test_bad_input_one_line(tiny, tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    three = tmp_path / "three.yaml"
    d = yaml.safe_load(Path(tiny["data"]).read_text())
    three.write_text(yaml.safe_dump({**d, "nc": 3, "names": ["a", "b", "c"]}))
    cases = [(dict(weights=str(onnx)), "is an ONNX file"),
             (dict(data=str(three)), "predicts 6 classes but"),
             (dict(calib_method="minmax"), "--calib-method 'minmax' is unknown"),
             (dict(imgsz=70), "--imgsz 70 is not a multiple of the model stride 32"),
             (dict(loss="kl"), "--loss kl is unknown")]
    # issue 16.9: --hyp invalid YAML, a missing loss gain, a non-numeric value
    (tmp_path / "broken.yaml").write_text("box: [7.5\n")
    (tmp_path / "nobox.yaml").write_text("cls: 0.5\ndfl: 1.5\n")
    (tmp_path / "words.yaml").write_text("box: big\ncls: 0.5\ndfl: 1.5\n")
    cases += [(dict(hyp=str(tmp_path / "broken.yaml")), "is not valid YAML"),
              (dict(hyp=str(tmp_path / "nobox.yaml"), loss="det"), "misses box"),
              (dict(hyp=str(tmp_path / "words.yaml")), "box='big' is not a finite number")]
    for kw, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            _run(tiny, "bad", **kw)
        assert "\n" not in str(e.value)
    assert not (tiny["root"] / "runs" / "bad").exists()  # a run that fails on its inputs leaves no folder
    p = subprocess.run([sys.executable, str(ROOT / "train_qat.py"), "--calib-method", "minmax"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and lines == ["error: argument --calib-method: invalid choice: 'minmax' (choose from "
                                           "'auto', 'max', 'percentile', 'mse', 'entropy') (see train_qat.py --help)"], \
        p.stderr[-2000:]


def test_resume_refuses_a_non_qat_or_damaged_checkpoint_before_writing(tiny, tmp_path):
    """Issue 16.5: --resume with a train.py checkpoint (or a damaged QAT one) is one line, and the
    opt.yaml beside it (that run's own) is left exactly as it was."""
    import torch

    from qat_testkit import save_fp32_checkpoint
    run = tmp_path / "train-run"
    last = save_fp32_checkpoint(run / "weights" / "last.pt")
    (run / "opt.yaml").write_text("epochs: 300\n")
    with pytest.raises(UserError, match="not a QAT checkpoint") as e:
        train_qat.run_api(resume=str(last), device="cpu", workers=0)
    assert "\n" not in str(e.value) and (run / "opt.yaml").read_text() == "epochs: 300\n"
    assert sorted(p.name for p in run.rglob("*")) == ["last.pt", "opt.yaml", "weights"]

    out = _run(tiny, "to-damage", epochs=0, no_eval_origin=True, no_eval_ptq=True)
    ckpt = load_checkpoint(out["last"])
    ckpt["qat"]["settings"] = "max"
    damaged = tmp_path / "qat-run" / "weights" / "qat_last.pt"
    damaged.parent.mkdir(parents=True)
    torch.save(ckpt, damaged)
    (damaged.parents[1] / "opt.yaml").write_text("epochs: 3\n")
    with pytest.raises(UserError, match="'qat.settings' is 'max'"):
        train_qat.run_api(resume=str(damaged), device="cpu", workers=0)
    assert (damaged.parents[1] / "opt.yaml").read_text() == "epochs: 3\n"


def test_train_py_qat(tiny):
    import train

    opt = train.run(weights=tiny["weights"], data=tiny["data"], qat=True, epochs=1, imgsz=IMGSZ, batch_size=4,
                    device="cpu", workers=0, project=str(tiny["root"] / "runs"), name="trainqat", exist_ok=True)
    run_dir = Path(opt.save_dir)
    assert is_qat_checkpoint(load_checkpoint(run_dir / "weights" / "qat_best.pt"))
    assert [r["model"] for r in json.loads((run_dir / "report.json").read_text())] == ["FP32", "PTQ", "QAT"]
    assert len(opt.results) == 7


def test_calibration_log_counts_the_batches_that_exist(tiny):
    """Issue 16 (minor): --calib-batches 32 on a split of 4 batches logs 4, not 32."""
    import logging

    from utils.general import LOGGER
    lines = []

    class _H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = _H()
    LOGGER.addHandler(h)
    try:
        out = _run(tiny, "calib-log", epochs=0, calib_batches=32, no_eval_origin=True, no_eval_ptq=True)
    finally:
        LOGGER.removeHandler(h)
    calib = [x for x in lines if "batches x 1 rank" in x]
    n_train = len((out["save_dir"] / "splits" / "train.txt").read_text().split())  # the rest held out to select on
    assert n_train >= 2 and len(calib) == 1 and f"{-(-n_train // 2)} batches x 1 rank" in calib[0], calib  # batch 2


def test_auto_skip_layers_reach_the_checkpoint_and_the_export(tiny, monkeypatch):
    """train_qat.py --auto-skip: the float layers the greedy search picks (its choice is tested in
    tests/qat/test_sensitivity.py; here it is fixed to layer 1, the tiny model's mAP being too low to rank
    anything) re-quantize the model without them, are stored in qat_best.pt and export without Q/DQ."""
    import export_qat
    import qat.sensitivity
    from qat.graph import import_graph
    from qat.lint import module_name

    monkeypatch.setattr(qat.sensitivity, "auto_skip", lambda model, ranked, fn, fp32, budget, base_map=None:
                        ([1], base_map, [([1], base_map)]))
    out = _run(tiny, "auto-skip", epochs=0, auto_skip=0.001, no_eval_origin=True, no_eval_ptq=True, select_images=2)
    assert out["settings"].skip_layers == [r"^model\.1\."]
    model, settings, _ = load_qat(out["best"])
    assert settings.skip_layers == [r"^model\.1\."]
    # the model the run calibrated (and would fine-tune) is the re-quantized one, not only the saved settings
    assert 1 not in qat.sensitivity.quantized_layers(out["model"]) and 0 in qat.sensitivity.quantized_layers(out["model"])
    assert 1 not in qat.sensitivity.quantized_layers(model)
    assert "layers [1] in float" in (out["save_dir"] / "sensitivity.md").read_text()
    export_qat.run(weights=out["best"], imgsz=[IMGSZ])
    graph = import_graph(out["best"].with_suffix(".onnx"))
    dq = lambda t: bool(t.inputs) and t.inputs[0].op == "DequantizeLinear"  # noqa: E731
    convs = {module_name(n): n for n in graph.nodes if n.op == "Conv" and ".dfl." not in module_name(n)}
    assert len(convs) > 20 and [k for k, n in convs.items() if not dq(n.inputs[0])] == ["model.1.conv"]
