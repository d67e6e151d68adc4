"""benchmarks/bench_accuracy.py: mean +- std over seeds, share of the PTQ drop recovered, the report
and chart (the real numbers come from running it; a tiny end-to-end run is too slow for the suite)."""
import pytest

from benchmarks import bench_accuracy as bench


def _per_seed():
    fp32 = {"map": 0.50, "map50": 0.7}
    return {"w7": {"FP32": [fp32, fp32, fp32],
                   "PTQ auto": [{"map": m, "map50": 0.6, "chosen": c} for m, c in ((0.48, "mse"), (0.49, "max"),
                                                                                    (0.47, "mse"))],
                   "QAT layers": [{"map": m, "map50": 0.6, "chosen": "step 60"} for m in (0.496, 0.497, 0.495)]}}


def test_summary_recovered_and_report(tmp_path):
    summary = bench.summarise(_per_seed())
    by = {r["model"]: r for r in summary["w7"]}
    assert by["PTQ auto"]["map_mean"] == pytest.approx(0.48) and by["PTQ auto"]["map_std"] == pytest.approx(0.01)
    assert by["PTQ auto"]["d_map_mean"] == pytest.approx(-0.02) and by["PTQ auto"]["chosen"] == ["mse", "max", "mse"]
    assert bench.recovered(summary["w7"]) == {"QAT layers": pytest.approx(0.8)}  # 0.016 of a 0.02 drop
    result = {"date": "d", "seconds": 1.0, "command": "c", "summary": summary,
              "options": {"weights": "w", "imgsz": 64, "val_images": 4, "seeds": [0, 1, 2], "calib_batches": 1,
                          "batch_size": 2, "select_images": 2, "epochs": 1, "iters_per_epoch": 2}}
    text = bench.to_markdown(result)
    assert "| PTQ auto | 0.4800 ± 0.0100 | -0.0200 |" in text and "QAT layers 80%" in text
    bench.chart(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_recovered_from_the_cases_own_calibration():
    """w7-entropy's QAT starts from entropy calibration: the drop recovered is measured from PTQ entropy,
    not from PTQ auto (which it may not even have)."""
    fp32 = {"map": 0.50, "map50": 0.7}
    per_seed = {"w7-entropy": {"FP32": [fp32, fp32], "PTQ auto": [{"map": 0.499, "map50": 0.7}] * 2,
                               "PTQ entropy": [{"map": 0.48, "map50": 0.6}] * 2,
                               "QAT layers": [{"map": 0.495, "map50": 0.6}] * 2}}
    table = bench.summarise(per_seed)["w7-entropy"]
    assert bench.CASES["w7-entropy"]["calib"] == "entropy"
    assert bench.recovered(table, "entropy") == {"QAT layers": pytest.approx(0.75)}
    result = {"date": "d", "seconds": 1.0, "command": "c", "summary": {"w7-entropy": table},
              "options": {"weights": "w", "imgsz": 64, "val_images": 4, "seeds": [0, 1], "calib_batches": 1,
                          "batch_size": 2, "select_images": 2, "epochs": 1, "iters_per_epoch": 2}}
    assert "Share of the PTQ (entropy) drop recovered: QAT layers 75%" in bench.to_markdown(result)


def test_deployed_rows_are_compared_with_fp32_of_their_own_protocol():
    """val_trt.py's square letterbox gives other numbers than train_qat.py's rectangular batches: the
    deployed and fake-quant rows get their Δ from the FP32 row of the same val_trt run."""
    fp32, fp32_vt = {"map": 0.50, "map50": 0.7}, {"map": 0.49, "map50": 0.7}
    per_seed = {"demo": {"FP32": [fp32, fp32], "PTQ auto": [{"map": 0.498, "map50": 0.7}] * 2,
                         bench.VAL_TRT_FP32: [fp32_vt, fp32_vt],
                         "deployed OpenVINO (QAT layers, val_trt protocol)": [{"map": 0.4895, "map50": 0.7}] * 2}}
    by = {r["model"]: r for r in bench.summarise(per_seed)["demo"]}
    assert by["PTQ auto"]["d_map_mean"] == pytest.approx(-0.002)
    assert by["deployed OpenVINO (QAT layers, val_trt protocol)"]["d_map_mean"] == pytest.approx(-0.0005)
    assert by[bench.VAL_TRT_FP32]["d_map_mean"] == pytest.approx(0.0)


def test_val_subset_keeps_the_selection_split_and_the_report_names_it(tmp_path):
    """subset_data keeps the data yaml's `select:` (train_qat.py chooses on it, not on train images)."""
    import yaml

    from utils.demo_data import generate

    data = generate(tmp_path / "d", n_train=2, n_val=3, imgsz=64, n_select=2)
    sub = yaml.safe_load(open(bench.subset_data(str(data), 2, tmp_path / "w")))
    assert sub["select"] == str(tmp_path / "d" / "images" / "select") and len(open(sub["val"]).read().split()) == 2
    assert bench.selection_description(str(data), 9) == "the data yaml's select split (2 images never trained on)"
    plain = generate(tmp_path / "p", n_train=2, n_val=3, imgsz=64)
    assert "select" not in yaml.safe_load(open(bench.subset_data(str(plain), 0, tmp_path / "w2")))
    assert bench.selection_description(str(plain), 9) == "9 held-out train images"


def test_deployed_rows_baseline_is_the_fp32_checkpoint_not_qat_weights_in_float():
    """val_trt.run's rows with the FP32 checkpoint beside qat_best.pt: the baseline is the checkpoint (QAT moves
    the float weights too), and qat_best.pt's float row is a note that never counts as a QAT recipe."""
    def row(model, m):
        return {"model": model, "mAP50-95": m, "mAP50": 0.7}

    got = bench.val_trt_rows([row("PyTorch FP32 demo-gelan.pt", 0.5098),
                              row("PyTorch FP32 (quantizers off) qat_best.pt", 0.5111),
                              row("PyTorch QAT fake-quant qat_best.pt", 0.5094), row("deployed (openvino)", 0.5093)])
    assert got[bench.VAL_TRT_FP32]["map"] == 0.5098 and got[bench.QAT_FLOAT]["map"] == 0.5111
    assert got["fake-quant"]["map"] == 0.5094 and got["deployed"]["map"] == 0.5093
    fp32 = {"map": 0.51, "map50": 0.7}
    per_seed = {"demo": {"FP32": [fp32], "PTQ auto": [{"map": 0.50, "map50": 0.7}],
                         "QAT kd": [{"map": 0.505, "map50": 0.7}], f"{bench.QAT_FLOAT[:-1]}, QAT kd)": [fp32]}}
    assert bench.recovered(bench.summarise(per_seed)["demo"]) == {"QAT kd": pytest.approx(0.5)}


def test_head_float_export_gets_its_own_deployed_row():
    """val_trt.run with qat_best.onnx and its --no-last-layer export (two files: each row named after its file):
    the head-float file's row is kept apart from the fully INT8 one, and both compare with the FP32 checkpoint."""
    def row(model, m):
        return {"model": model, "mAP50-95": m, "mAP50": 0.7, "runtime": "openvino CPU"}

    got = bench.val_trt_rows([row("PyTorch FP32 demo-gelan.pt", 0.5098),
                              row("deployed (openvino) qat_best.onnx", 0.5087),
                              row(f"deployed (openvino) qat_best{bench.HEAD_FLOAT_SUFFIX}.onnx", 0.5101)])
    assert got["deployed"]["map"] == 0.5087 and got[bench.HEAD_FLOAT]["map"] == 0.5101
    label = "deployed OpenVINO, head float (QAT kd, --no-last-layer, val_trt protocol)"
    table = bench.summarise({"demo": {bench.VAL_TRT_FP32: [got[bench.VAL_TRT_FP32]], label: [got[bench.HEAD_FLOAT]]}})
    assert {r["model"]: r["d_map_mean"] for r in table["demo"]}[label] == pytest.approx(0.0003)


def test_auto_skip_rows_recover_from_the_ptq_with_the_same_float_layers():
    """--auto-skip: the QAT run's PTQ row has the float layers too; the drop recovered is measured from it,
    and each row names the layers the run kept float."""
    from qat.settings import QuantSettings
    skip = bench.skip_suffix(0.0005)
    assert skip == ", auto-skip 0.0005" and bench.skip_suffix(None) == ""
    assert bench.float_layers(QuantSettings(skip_layers=[r"^model\.1\.", r"^model\.15\."])) == "; float 1 15"
    assert bench.float_layers(QuantSettings()) == "; float none"
    fp32 = {"map": 0.50, "map50": 0.7}
    per_seed = {"demo": {"FP32": [fp32, fp32], "PTQ auto": [{"map": 0.48, "map50": 0.6}] * 2,
                         f"PTQ auto{skip}": [{"map": 0.496, "map50": 0.7, "chosen": "mse; float 1"}] * 2,
                         f"QAT kd{skip}": [{"map": 0.499, "map50": 0.7, "chosen": "step 40; float 1"}] * 2}}
    table = bench.summarise(per_seed)["demo"]
    assert bench.recovered(table, "auto", skip) == {f"QAT kd{skip}": pytest.approx(0.75)}
    result = {"date": "d", "seconds": 1.0, "command": "c", "summary": {"demo": table},
              "options": {"weights": "w", "imgsz": 64, "val_images": 4, "seeds": [0, 1], "calib_batches": 1,
                          "batch_size": 2, "select_images": 2, "epochs": 1, "iters_per_epoch": 2, "auto_skip": 0.0005}}
    text = bench.to_markdown(result)
    assert f"QAT kd{skip} 75%" in text and "step 40; float 1, step 40; float 1" in text
