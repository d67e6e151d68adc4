"""qat.bias_correction: after correction every quantized convolution's per-channel output mean equals
the FP32 model's on the correction images (the sequential form: each layer measured with the earlier
ones corrected), the detection output moves closer to FP32 on other images, and the pipeline's
--bias-correction step writes the corrected biases into the checkpoint."""
import json
import warnings

import torch
import torch.nn as nn

from qat.bias_correction import correct_biases, first_images
from qat.modules import QuantConv2d
from qat_testkit import fp32_model, images, qat_model


def _conv_means(model, x):
    """{conv name: per-channel mean of its output over images and positions}, measured with plain
    hooks on nn.Conv2d (independent of qat.bias_correction)."""
    means, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def keep(mod, args, out, name=name):
                means.setdefault(name, out.double().mean((0, 2, 3)))
            handles.append(m.register_forward_hook(keep))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return means


def _head_output(model, x):
    with torch.no_grad():
        y = model.eval()(x)
    return y[0] if isinstance(y, tuple) else y


def _pair():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fp32_model(), qat_model(weight_bits=7)  # 7-bit weights: a clearly visible mean shift


def test_corrected_channel_means_match_fp32():
    fp32, q = _pair()
    x = images(8, seed=3)
    ref = _conv_means(fp32, x)
    before = _conv_means(q, x)
    names = [n for n, m in q.named_modules() if isinstance(m, QuantConv2d)]
    worst_before = max(float((before[n] - ref[n]).abs().max()) for n in names)
    summary = correct_biases(q, fp32, x)
    assert sorted(r["name"] for r in summary) == sorted(names)  # every quantized conv
    after = _conv_means(q, x)
    for n in names:
        scale = float(ref[n].abs().max()) + 1.0
        assert torch.allclose(after[n], ref[n], rtol=0, atol=1e-5 * scale), n
    assert worst_before > 100 * 1e-5  # there was a shift to remove


def test_reduces_output_error_on_other_images():
    fp32, q = _pair()
    held_out = images(8, seed=5)
    err_before = float((_head_output(q, held_out) - _head_output(fp32, held_out)).pow(2).mean())
    correct_biases(q, fp32, images(8, seed=3))
    err_after = float((_head_output(q, held_out) - _head_output(fp32, held_out)).pow(2).mean())
    assert err_after < 0.8 * err_before


def test_first_images_takes_n_across_batches():
    batches = [(torch.full((3, 3, 4, 4), i, dtype=torch.uint8), None) for i in range(4)]
    x = first_images(batches, 7, "cpu")
    assert x.shape[0] == 7 and x.dtype == torch.float32
    assert [float(v) for v in x[:, 0, 0, 0] * 255] == [0, 0, 0, 1, 1, 1, 2]


def test_pipeline_bias_correction_in_checkpoint(tmp_path):
    import train_qat
    from qat.checkpoint import load_qat
    from qat_models import IMGSZ, tiny_run_inputs

    tiny = tiny_run_inputs(tmp_path)
    base = dict(weights=tiny["weights"], data=tiny["data"], project=str(tmp_path / "runs"), imgsz=IMGSZ,
                batch_size=2, calib_batches=2, device="cpu", workers=0, epochs=0, calib_method="max",
                select_images=2, no_eval_origin=True, no_eval_ptq=True)
    plain = train_qat.run_api(name="plain", **base)
    corrected = train_qat.run_api(name="bc", bias_correction=4, **base)
    rows = json.loads((corrected["save_dir"] / "bias_correction.json").read_text())
    assert rows and all(r["max_abs"] >= r["mean_abs"] >= 0 for r in rows)
    m0, _, _ = load_qat(plain["best"])
    m1, _, ck = load_qat(corrected["best"])
    assert ck["opt"]["bias_correction"] == 4
    b0, b1 = dict(m0.named_modules()), dict(m1.named_modules())
    moved = [r["name"] for r in rows if not torch.equal(b0[r["name"]].bias, b1[r["name"]].bias)]
    assert len(moved) == len(rows)


def test_options_schema():
    import train_qat
    from qat.options import finetune_options, settings_from_opt

    assert train_qat.parse_opt([]).bias_correction == 0
    assert train_qat.parse_opt(["--bias-correction"]).bias_correction == 32
    assert train_qat.parse_opt(["--bias-correction", "8"]).bias_correction == 8
    opt = train_qat.parse_opt(["--learn-ranges", "--range-lr-mult", "30"])
    f = finetune_options(opt, ".", settings_from_opt(opt))
    assert f.learn_ranges and f.range_lr_mult == 30
