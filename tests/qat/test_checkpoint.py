"""qat.checkpoint: the round trip restores exactly the same fake-quant outputs, through the safe loader."""
import re

import pytest
import torch

from models.experimental import load_checkpoint
from qat.calibrate import calibrate
from qat.checkpoint import is_qat_checkpoint, load_qat, save_qat
from qat.compat import UserError
from qat.finetune import FinetuneOptions, Trainer
from qat.quantize import quantizer_summary, quantize_model
from qat.settings import QuantSettings
from qat_testkit import fp32_model, noise_images, save_fp32_checkpoint


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        y, maps = model(x)
    model.train()
    with torch.no_grad():
        raw = model(x)
    model.eval()
    flat = lambda o: torch.cat([t.flatten() for t in o]) if isinstance(o, (list, tuple)) else o.flatten()  # noqa
    return [flat(y), flat([flat(m) for m in raw])]


@pytest.mark.parametrize("cfg,settings", [
    ("gelan-t", QuantSettings()),
    ("yolov9-c", QuantSettings(weight_bits=7, calib_method="percentile", no_last_layer=True,
                               skip_layers=[r"^model\.5\."])),
])
def test_round_trip_identical_outputs(cfg, settings, tmp_path):
    fp32 = fp32_model(cfg)
    q = quantize_model(fp32_model(cfg), settings)
    calibrate(q, [noise_images(2, seed=3)], settings, show=False)
    fp32.hyp = q.hyp = {}
    trainer = Trainer(q, fp32, FinetuneOptions(lr=3e-3))  # big steps: some weights leave their range
    for s in range(2):
        trainer.step(((noise_images(2, seed=s) * 255).to(torch.uint8),), 3e-3)
    trainer.close()  # the saved model must not depend on hooks being gone: save_qat strips them anyway
    f = save_qat(tmp_path / "qat.pt", q, settings, {"epoch": 3, "opt": {"weights": tmp_path / "w.pt"}})

    ckpt = load_checkpoint(f)  # the project's safe loader, no --trusted
    assert is_qat_checkpoint(ckpt) and ckpt["epoch"] == 3 and ckpt["opt"]["weights"] == str(tmp_path / "w.pt")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
    assert not [g for g in unsafe if "modelopt" in g or g.startswith("qat.")], unsafe

    loaded, s2, _ = load_qat(f)
    assert s2 == settings
    x = noise_images(2, seed=9)
    for a, b in zip(_outputs(q, x), _outputs(loaded, x)):
        assert torch.equal(a, b)
    rows = {r["name"]: r for r in quantizer_summary(q)}
    rows2 = {r["name"]: r for r in quantizer_summary(loaded)}
    assert rows.keys() == rows2.keys()
    assert all(rows[k]["amax"] == rows2[k]["amax"] and rows[k]["enabled"] == rows2[k]["enabled"] for k in rows)


def test_plain_checkpoint_is_not_qat(tmp_path):
    f = save_fp32_checkpoint(tmp_path / "fp32.pt")
    assert not is_qat_checkpoint(load_checkpoint(f))
    with pytest.raises(UserError, match="plain checkpoint, not a QAT one") as e:
        load_qat(f)
    assert "\n" not in str(e.value)


def test_quantizer_disabled_by_calibration_comes_back_disabled(tmp_path):
    from qat.export import export_qat_onnx
    from qat.quantize import unique_quantizers

    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    calibrate(q, [noise_images(2, seed=3)], QuantSettings(), show=False)
    name, quantizer, _ = next(u for u in unique_quantizers(q) if u[0].endswith("input_quantizer"))
    quantizer.reset_amax()  # what calibrate leaves for a quantizer that saw no data: disabled, no amax
    quantizer.disable()
    f = save_qat(tmp_path / "qat.pt", q)
    loaded, _, _ = load_qat(f)
    after = dict((n, qq) for n, qq, _ in unique_quantizers(loaded))
    assert after[name]._disabled and after[name].amax is None
    x = noise_images(2, seed=9)
    for a, b in zip(_outputs(q, x), _outputs(loaded, x)):
        assert torch.equal(a, b)
    export_qat_onnx(loaded, tmp_path / "ok.onnx", imgsz=64)  # exports: the point stays float

    # a file without the disabled list (older format): the quantizer comes back enabled with no amax;
    # export then stops with one line instead of modelopt's assertion
    ckpt = load_checkpoint(f)
    del ckpt["qat"]["disabled"]
    torch.save(ckpt, tmp_path / "old.pt")
    old, _, _ = load_qat(tmp_path / "old.pt")
    with pytest.raises(UserError, match=f"no calibrated range \\(first: {name}\\)") as e:
        export_qat_onnx(old, tmp_path / "bad.onnx", imgsz=64)
    assert "\n" not in str(e.value) and not (tmp_path / "bad.onnx").exists()


def _damaged_cases():
    nan, neg = torch.tensor([float("nan")]), torch.tensor([-1.0])
    return [
        (lambda c: c.__setitem__("model", None), "no 'model' or 'ema' entry holding a model"),  # the loader's check
        (lambda c: c.__setitem__("qat", "qat"), "'qat' is str, not a dict"),
        (lambda c: c["qat"].__setitem__("settings", "max"), "'qat.settings' is 'max', not a dict"),
        (lambda c: c["qat"].__setitem__("settings", {}), "'qat.settings' is {}, not a dict"),
        (lambda c: c["qat"]["settings"].__setitem__("weight_bits", "eight"), "'qat.settings'"),
        (lambda c: c["qat"]["settings"].__setitem__("calib_method", "best"), "'qat.settings': --calib-method"),
        (lambda c: c["qat"].__setitem__("quantizer_state", {}), "'qat.quantizer_state' is not a non-empty dict"),
        (lambda c: c["qat"].__setitem__("quantizer_state", [1, 2]), "'qat.quantizer_state' is not a non-empty dict"),
        (lambda c: c["qat"]["quantizer_state"].__setitem__(next(iter(c["qat"]["quantizer_state"])), nan),
         "is not finite and >= 0"),
        (lambda c: c["qat"]["quantizer_state"].__setitem__(next(iter(c["qat"]["quantizer_state"])), neg),
         "is not finite and >= 0"),
        (lambda c: c["qat"]["quantizer_state"].__setitem__(next(iter(c["qat"]["quantizer_state"])), "1.0"),
         "is not a name -> float amax tensor"),
        (lambda c: c["qat"].__setitem__("groups", "all"), "'qat.groups' is not a list of lists"),
        (lambda c: c["qat"].__setitem__("groups", [[1, 2]]), "'qat.groups' is not a list of lists"),
        (lambda c: c["qat"].__setitem__("version", "1"), "'qat' version '1'"),
    ]


def test_damaged_qat_entry_is_one_line(tmp_path):
    """Issue 16.6: every damaged part of a QAT checkpoint is refused by load_qat (and so by export,
    val_trt and --resume) with one line naming it; a 'qat' entry of the wrong type is never taken for
    a plain FP32 checkpoint (that exported an ONNX without any Q/DQ)."""
    from export_qat import load_for_export

    q = quantize_model(fp32_model("gelan-t"), QuantSettings())
    calibrate(q, [noise_images(2, seed=3)], show=False)
    good = save_qat(tmp_path / "good.pt", q, QuantSettings())
    for i, (damage, message) in enumerate(_damaged_cases()):
        ckpt = load_checkpoint(good)
        damage(ckpt)
        f = tmp_path / f"bad{i}.pt"
        torch.save(ckpt, f)
        with pytest.raises(UserError, match=re.escape(message)) as e:
            load_qat(f)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match=re.escape(message)):
            load_for_export(f, torch.device("cpu"), False, False)
    load_qat(good)  # the undamaged file still loads
