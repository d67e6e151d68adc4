"""val_trt.py: the FP32 / QAT fake-quant / reference / deployed table through val.run, and its errors."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "qat"))
import qat_testkit as kit  # noqa: E402
import val_trt  # noqa: E402
from qat.deploy import tensorrt_available  # noqa: E402
from utils.general import UserError  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return kit.val_inputs(tmp_path_factory.mktemp("val_trt"))


def test_table_rows_agree(setup, tmp_path):
    data, ckpt = setup
    r = val_trt.run(data=data, onnx=kit.onnx_path("qat"), weights=ckpt, batch_size=2, backend="openvino", threads=2,
                    workers=0, project=tmp_path, name="v")
    rows = {row["model"]: row for row in r["rows"]}
    assert list(rows) == ["PyTorch FP32 (quantizers off)", "PyTorch QAT fake-quant", "ONNX Runtime (reference)",
                          "deployed (openvino)"]
    assert r["reference"] == "ONNX Runtime (reference)" and abs(r["deployed_delta"]) <= 0.002
    assert abs(rows["ONNX Runtime (reference)"]["mAP50-95"] - rows["PyTorch QAT fake-quant"]["mAP50-95"]) <= 0.002
    assert all(row["ms_per_img"] > 0 for row in rows.values())
    text = (tmp_path / "v" / "results.md").read_text()
    assert "convolutions in INT8" in text and "| deployed (openvino) |" in text
    assert (tmp_path / "v" / "results.json").is_file()


def test_fp32_onnx_without_weights(setup, tmp_path):
    data, _ = setup
    r = val_trt.run(data=data, onnx=kit.onnx_path("fp32"), batch_size=2, backend="onnxruntime", workers=0,
                    project=tmp_path, name="f")
    assert [row["model"] for row in r["rows"]] == ["deployed (onnxruntime)"]


def test_bad_input(setup, tmp_path, capsys):
    data, ckpt = setup
    with pytest.raises(UserError, match="--onnx FILE or --engine FILE"):
        val_trt.run(data=data, project=tmp_path)
    with pytest.raises(UserError, match="has no QuantizeLinear"):  # a float ONNX for a QAT checkpoint
        val_trt.run(data=data, onnx=kit.onnx_path("fp32"), weights=ckpt, project=tmp_path)
    bad = [("--backend", "tflite", "--backend: invalid choice: 'tflite'")]
    if not tensorrt_available()[0]:
        bad.append(("--backend", "tensorrt", "backend 'tensorrt' is not available here"))
    for flag, value, message in bad:
        with pytest.raises(SystemExit) as e:
            val_trt.main(["--onnx", str(kit.onnx_path("qat")), "--data", str(data), flag, value,
                          "--project", str(tmp_path)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
