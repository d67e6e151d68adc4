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
    r = val_trt.run(data=data, onnx=kit.onnx_path("qat"), checkpoint=ckpt, batch_size=2, backend="openvino", threads=2,
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
    assert [row["model"] for row in r["rows"]] == ["FP32 baseline (onnxruntime)"]


def test_export_py_float_onnx_beside_the_int8_one(setup, tmp_path):
    """upstream's --weights convention: export.py's FP32 ONNX (also one with the older Python-repr
    metadata) gives the baseline row beside the Q/DQ file's rows, in one table."""
    import onnx

    import export
    from utils.torch_utils import save_atomic

    data, ckpt = setup
    fp32_pt = save_atomic({"model": kit.fp32_model().half(), "ema": None, "epoch": -1}, tmp_path / "fp32.pt")
    fp32_onnx = export.run(fp32_pt, imgsz=(kit.IMGSZ,))
    old = onnx.load(str(fp32_onnx))  # as export.py wrote it before: str() of Python values, no 'qat' key
    del old.metadata_props[:]
    old.metadata_props.add(key="stride", value="32")
    old.metadata_props.add(key="names", value=str(dict(enumerate(kit.NAMES))))
    onnx.save(old, str(tmp_path / "old.onnx"))
    r = val_trt.run(data=data, weights=[str(fp32_onnx), str(tmp_path / "old.onnx"), str(kit.onnx_path("qat"))],
                    checkpoint=str(ckpt), batch_size=2, backend="onnxruntime", workers=0, project=tmp_path, name="b")
    rows = {row["model"]: row for row in r["rows"]}
    assert list(rows) == ["PyTorch FP32 (quantizers off)", "PyTorch QAT fake-quant", "FP32 baseline (onnxruntime) "
                          "fp32.onnx", "FP32 baseline (onnxruntime) old.onnx", "deployed (onnxruntime) qat.onnx"]
    fp32 = rows["PyTorch FP32 (quantizers off)"]["mAP50-95"]
    assert rows["FP32 baseline (onnxruntime) fp32.onnx"]["mAP50-95"] == pytest.approx(fp32, abs=1e-3)
    assert rows["FP32 baseline (onnxruntime) old.onnx"]["mAP50-95"] == pytest.approx(fp32, abs=1e-3)
    from qat.deploy import load_backend

    assert load_backend("onnxruntime", tmp_path / "old.onnx").names == kit.NAMES  # not a list of characters


def test_broken_qdq_files_are_refused(setup, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    data, _ = setup
    for bad_value in (0.0, float("nan"), -0.01):
        m = onnx.load(str(kit.onnx_path("qat")))
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and "input_quantizer" in n.name)
        init = next(t for t in m.graph.initializer if t.name == q.input[1])
        init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), bad_value), init.name))
        onnx.save(m, str(tmp_path / "bad.onnx"))
        with pytest.raises(UserError, match="qat.lint found .* violation"):
            val_trt.run(data=data, weights=str(tmp_path / "bad.onnx"), backend="onnxruntime", workers=0,
                        project=tmp_path)
    half = kit.onnx_path("qat").read_bytes()
    (tmp_path / "half.onnx").write_bytes(half[: len(half) // 2])  # an export cut short
    with pytest.raises(SystemExit) as e:
        val_trt.main(["--weights", str(tmp_path / "half.onnx"), "--data", str(data), "--project", str(tmp_path)])
    assert e.value.code == 2


def test_bad_input(setup, tmp_path, capsys):
    data, ckpt = setup
    with pytest.raises(UserError, match="pass a model: --weights"):
        val_trt.run(data=data, project=tmp_path)
    with pytest.raises(UserError, match="has no QuantizeLinear"):  # a float ONNX for a QAT checkpoint
        val_trt.run(data=data, onnx=kit.onnx_path("fp32"), checkpoint=ckpt, project=tmp_path)
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


def test_openvino_ir_folder_from_export_qat(setup, tmp_path):
    """export_qat.py --include onnx openvino -> <stem>_openvino_model/, which val_trt takes as the model
    (backend auto -> openvino) and validates like the ONNX it came from."""
    import shutil

    import export_qat

    data, ckpt = setup
    weights = tmp_path / "qat_best.pt"
    shutil.copy(ckpt, weights)
    out = export_qat.run(weights, imgsz=[kit.IMGSZ], batch_size=2, include=["onnx", "openvino"], act_form="uint8",
                         vnni="yes", threads=1)
    folder = tmp_path / "qat_best_openvino_model"
    assert out["openvino"]["path"] == str(folder) and (folder / "qat_best.xml").is_file()
    assert out["openvino"]["choice"]["act_form"] == "uint8" and (tmp_path / "qat_best.onnx").is_file()
    r = val_trt.run(data=data, onnx=folder, batch_size=2, threads=2, workers=0, project=tmp_path, name="ir")
    from_onnx = val_trt.run(data=data, onnx=tmp_path / "qat_best.onnx", batch_size=2, backend="openvino", threads=2,
                            act_form="uint8", vnni="yes", workers=0, reference=False, project=tmp_path, name="onnx")
    assert r["backend"] == "openvino" and r["act_form"]["act_form"] == "uint8"
    assert [row["model"] for row in r["rows"]] == ["deployed (openvino)"]  # no ONNX Runtime row for an IR
    assert r["rows"][-1]["mAP50-95"] == from_onnx["rows"][-1]["mAP50-95"]
    assert "OpenVINO INT8 form: uint8 activations" in (tmp_path / "ir" / "results.md").read_text()
    with pytest.raises(UserError, match="is an OpenVINO IR: use --backend openvino"):
        val_trt.run(data=data, onnx=folder, backend="onnxruntime", project=tmp_path)
    with pytest.raises(UserError, match="--include tflite: unknown; use any of onnx openvino"):
        export_qat.run(weights, include=["onnx", "tflite"])
