"""benchmarks/bench_agreement.py: deployed-vs-reference agreement, noise floor and layer flip counts
on the tiny test network (the real numbers come from running it on the demo model)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qat"))
import qat_testkit as kit  # noqa: E402
from benchmarks import bench_agreement as bench  # noqa: E402
from utils.general import UserError  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return kit.val_inputs(tmp_path_factory.mktemp("agree"))


def test_agreement_report(setup):
    data, ckpt = setup
    r = bench.run(kit.onnx_path("qat"), data, weights=ckpt, imgsz=kit.IMGSZ, batch_size=2, repeats=2, sigma=1e-3,
                  layers=3, layer_images=2, threads=1, workers=0, name="t")
    rows = {row["model"]: row for row in r["rows"]}
    assert list(rows) == ["ONNX Runtime (reference)", "OpenVINO INT8 (deployed)", "PyTorch QAT fake-quant"]
    assert rows["ONNX Runtime (reference)"]["delta_vs_reference"] == 0.0
    for label in ("OpenVINO INT8 (deployed)", "PyTorch QAT fake-quant"):
        assert rows[label]["delta_vs_reference"] == pytest.approx(
            rows[label]["mAP50-95"] - rows["ONNX Runtime (reference)"]["mAP50-95"])
        o = rows[label]["outputs_vs_reference"]
        if o["anchors"]:  # the random test net may be confident nowhere
            assert 0 <= o["box_mean_px"] <= o["box_p99_px"] <= o["box_max_px"]
    nz = r["noise"]
    assert len(nz["mAP50-95"]) == 2 and nz["mean"] == pytest.approx(np.mean(nz["mAP50-95"]))
    flips = r["layer_flips"]
    assert [f["depth"] for f in flips] == sorted(f["depth"] for f in flips) and flips[0]["depth"] == 0
    assert flips[-1]["depth"] == flips[-1]["of"] - 1
    assert flips[0]["flips"] <= 1e-3  # the input quantizer: same arithmetic in both runtimes
    assert all(0 <= f["flips_gt1"] <= f["flips"] <= 1 for f in flips)
    text = bench.to_markdown(r)
    assert "| OpenVINO INT8 (deployed) |" in text and "Noise floor: 2 reference runs" in text
    json.dumps(r)  # the results file is plain JSON


def test_perturbed_input_changes_only_with_sigma(setup):
    """The noise-floor runs really perturb the input, and sigma 0 is the clean run."""
    from qat.deploy import load_backend

    ort = load_backend("onnxruntime", kit.onnx_path("qat"), threads=1)
    x = kit.images(2)
    clean, same, noisy = bench.Tap(ort), bench.Tap(ort, 0.0, seed=1), bench.Tap(ort, 0.05, seed=1)
    assert np.array_equal(clean(x).numpy(), same(x).numpy())
    assert not np.array_equal(clean(x).numpy(), noisy(x).numpy())
    assert len(clean.outputs) == 2 and len(noisy.outputs) == 1  # one kept output per call


def test_bad_input(setup, tmp_path):
    data, _ = setup
    with pytest.raises(UserError, match="not found"):
        bench.run(tmp_path / "missing.onnx", data)
    with pytest.raises(UserError, match="has no QuantizeLinear"):
        bench.run(kit.onnx_path("fp32"), data)
    with pytest.raises(UserError, match="at least 2"):
        bench.run(kit.onnx_path("qat"), data, repeats=1)
