"""demo.py's summary: quantization rows (train_qat.py's protocol) and deployment rows (val_trt.py's)
in separate tables, each with deltas against its own baseline; its selection split."""
from pathlib import Path

import demo


def test_summary_keeps_the_two_protocols_apart():
    report = [{"model": "FP32", "map": 0.50, "map50": 0.70}, {"model": "PTQ", "map": 0.49, "map50": 0.69},
              {"model": "QAT", "map": 0.495, "map50": 0.695}]
    deployed = {"rows": [{"model": "ONNX Runtime (reference)", "mAP50-95": 0.48, "mAP50": 0.68},
                         {"model": "deployed (openvino)", "mAP50-95": 0.481, "mAP50": 0.681}],
                "reference": "ONNX Runtime (reference)", "deployed_delta": 0.001}
    latency = {"float_label": "FP32 ONNX (default (bf16))", "float_ms": 12.0, "int8_label": "INT8 Q/DQ ONNX (uint8 form)",
               "int8_ms": 8.0}
    text, rows, deploy_rows = demo.summary("demo", report, deployed, "qat_best.pt: QAT epoch 1", 2, latency, 300)
    quant, deploy = text.split("Deployment of qat_best.onnx")
    assert "| QAT | 0.4950 | 0.6950 | -0.0050 |" in quant and "ONNX Runtime" not in quant
    assert "| deployed (openvino) | 0.4810 | 0.6810 | +0.0010 |" in deploy and "| PTQ |" not in deploy
    assert "qat_best.pt: QAT epoch 1" in quant and "mAP50-95 +0.0010 (val_trt.py tolerance" in deploy
    assert "fastest float FP32 ONNX (default (bf16)) 12.0 ms" in text and "1.50x faster" in text
    assert "wall time of this demo: 300 s" in text
    assert [r[0] for r in rows] == ["FP32", "PTQ", "QAT"] and len(deploy_rows) == 2
    slow = demo.summary("demo", report, deployed, "", 2, {**latency, "int8_ms": 15.0}, 300)[0]
    assert "1.25x slower" in slow and "faster" not in slow  # never a ratio below one shown as a speed-up


def test_steps_run_single_threaded_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo._step_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo._step_env()["OMP_NUM_THREADS"] == "2"


def test_selection_uses_the_first_images_of_the_yamls_select_split(tmp_path):
    """demo.py's train_qat.py run chooses on the data's `select:` split (images the checkpoint never
    trained on), its first --select-images of them; without one, on held-out train images."""
    from utils.demo_data import generate

    data = generate(tmp_path / "d", n_train=2, n_val=1, imgsz=64, n_select=5)
    args = demo.selection_args(str(data), 3, tmp_path)
    assert args[0] == "--select-split"
    listed = Path(args[1]).read_text().split()
    assert listed == sorted(str(p) for p in (tmp_path / "d" / "images" / "select").glob("*.jpg"))[:3]
    plain = generate(tmp_path / "p", n_train=2, n_val=1, imgsz=64)
    assert demo.selection_args(str(plain), 3, tmp_path / "p") == ["--select-images", 3]
