"""qat.learned_ranges: the gradient wrt amax is LSQ's (computed here from the formula), the forward
equals modelopt's fake quantization at the same amax, training shrinks an amax set far too large,
amax stays positive, and the learned amax is what the checkpoint saves and the ONNX Q/DQ carries."""
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qat.checkpoint import load_qat, save_qat
from qat.finetune import FinetuneOptions, Trainer, make_optimizer
from qat.learned_ranges import LearnedRangeQuantizer, enable_learned_ranges, learnable_quantizers
from qat.modules import make_input_quantizer
from qat.quantize import unique_quantizers
from qat_testkit import IMGSZ, fp32_model, images, qat_model


def _quantizer(amax):
    q = make_input_quantizer("max")
    q.amax = torch.tensor(float(amax))
    q.__class__ = LearnedRangeQuantizer
    q.start_learning()
    return q


def _lsq_grad_amax(x, amax, upstream, bits=8):
    """d(sum(upstream * fq(x)))/d amax from Esser et al.'s formula, written out here: with step
    s = amax / Qp, d fq/ds = round(x/s) - x/s inside [-Qn, Qp], -Qn / Qp where clipped; ds/d amax =
    1/Qp; times the gradient scale g = 1/sqrt(N * Qp)."""
    x, upstream = x.double(), upstream.double()
    qp, qn = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    s = amax / qp
    v = x / s
    d = torch.where(v <= -qn, torch.full_like(v, -qn), torch.where(v >= qp, torch.full_like(v, qp), torch.round(v) - v))
    g = 1 / math.sqrt(x.numel() * qp)
    return float((upstream * d).sum()) / qp * g


def test_gradient_wrt_amax_is_lsq():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=gen) * 2  # some values beyond amax on both sides
    upstream = torch.randn(x.shape, generator=gen)
    amax = 3.0
    q = _quantizer(amax)
    (q(x) * upstream).sum().backward()
    amax_now = float(q.amax)
    grad_amax = float(q.log_amax.grad) / amax_now  # the parameter is log(amax): d/d log = amax * d/d amax
    expected = _lsq_grad_amax(x, amax_now, upstream)
    assert abs(expected) > 1e-4
    assert math.isclose(grad_amax, expected, rel_tol=1e-4, abs_tol=1e-7)


def test_gradient_wrt_input_is_straight_through_inside_the_range():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 5, 5, generator=gen) * 2).requires_grad_(True)  # some beyond amax
    upstream = torch.randn(x.shape, generator=gen)
    q = _quantizer(3.0)
    (q(x) * upstream).sum().backward()
    amax = float(q.amax)
    steps = torch.round(x.detach() * 127 / amax)
    inside = (steps >= -128) & (steps <= 127)
    assert 0 < int((~inside).sum()) < x.numel()
    assert torch.allclose(x.grad, upstream * inside)


def test_forward_equals_modelopt_fake_quant():
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(1)) * 3
    q = _quantizer(2.5)
    ref = make_input_quantizer("max")
    ref.amax = q.amax.clone()  # exp(log(2.5)) in float32
    with torch.no_grad():
        expected = ref(x)
    assert torch.equal(q(x), expected)  # LSQ path (grad enabled)
    with torch.no_grad():
        assert torch.equal(q(x), expected)  # modelopt's own path


def test_training_shrinks_an_amax_far_too_large():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    q = _quantizer(100.0)  # N(0, 1) data: the MSE-optimal amax is about 4
    with torch.no_grad():
        err0 = float((q(x) - x).pow(2).mean())
    opt = torch.optim.Adam([q.log_amax], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    assert 2.0 < float(q.amax) < 8.0
    with torch.no_grad():
        assert float((q(x) - x).pow(2).mean()) < 0.05 * err0
    assert float(q.amax) > 0


def test_amax_stays_positive_under_a_huge_step():
    q = _quantizer(1.0)
    with torch.no_grad():
        q.log_amax -= 1000.0  # what a wild optimizer step could do
    assert float(q.amax) >= 0 and math.isfinite(float(q.amax))


def _act_scales(path):
    """Scales of the activation QuantizeLinear nodes (scalar scale) of an ONNX file."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    consts = {o: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node if n.op_type == "Constant"
              for o in n.output}
    out = []
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            s = inits.get(n.input[1], consts.get(n.input[1]))
            if s is not None and np.asarray(s).size == 1:
                out.append(float(np.asarray(s)))
    return out


def test_learned_amax_is_saved_loaded_and_exported(tmp_path):
    from qat.export import export_qat_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, fp32 = qat_model(), fp32_model()
    opts = FinetuneOptions(epochs=1, iters_per_epoch=1, learn_ranges=True, range_lr_mult=1e4, lr=1e-5,
                           diagnostics=False, show=False)
    trainer = Trainer(model, fp32, opts)
    calibrated = {id(q): float(q.amax) for q in learnable_quantizers(model)}
    imgs = (images(2, seed=3) * 255).to(torch.uint8)
    for _ in range(3):
        trainer.step((imgs, torch.zeros(0, 6), None, None), opts.lr)
        model.float()  # what the evaluation between steps does (qat.evaluation.make_val_fn)
    trainer.close()
    learned = learnable_quantizers(model)
    assert learned and all(isinstance(q, LearnedRangeQuantizer) for q in learned)
    assert sum(abs(float(q.amax) - calibrated[id(q)]) > 1e-4 * calibrated[id(q)] for q in learned) >= len(learned) // 2
    assert len(trainer.optimizer.param_groups) == 2 and trainer.optimizer.param_groups[1]["lr_mult"] == 1e4

    save_qat(tmp_path / "q.pt", model)
    loaded, _, _ = load_qat(tmp_path / "q.pt")
    learned_ids = {id(q) for q in learned}
    want = {name: float(q.learned_amax()) for name, q, _ in unique_quantizers(model) if id(q) in learned_ids}
    got = {name: float(q.amax) for name, q, _ in unique_quantizers(loaded) if name in want}
    assert want and all(math.isclose(got[k], v, rel_tol=1e-6) for k, v in want.items())  # float32 amax buffer

    path = tmp_path / "q.onnx"
    export_qat_onnx(loaded, path, IMGSZ, batch_size=1)
    scales = _act_scales(path)
    for amax in want.values():  # every learned amax is a Q/DQ scale amax / 127 of the exported graph
        assert any(math.isclose(s, amax / 127, rel_tol=1e-6) for s in scales), amax


def test_optimizer_without_learned_ranges_has_one_group():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qat_model()
    opts = FinetuneOptions(epochs=1, iters_per_epoch=1).validate()
    assert len(make_optimizer(model, opts).param_groups) == 1
    assert enable_learned_ranges(model)  # then the ranges get their own group
    assert len(make_optimizer(model, opts).param_groups) == 2


def test_train_qat_learn_ranges_killed_and_resumed(tmp_path, monkeypatch):
    """--learn-ranges end to end: the ranges train, the checkpoints hold them, and a killed run resumes
    (its optimizer state has the ranges' group)."""
    import pytest
    import train_qat
    from qat_testkit import IMGSZ as TINY, interrupt_step_at, tiny_run_inputs

    tiny = tiny_run_inputs(tmp_path)
    base = dict(weights=tiny["weights"], data=tiny["data"], project=str(tmp_path / "runs"), name="lr", imgsz=TINY,
                batch_size=2, calib_batches=2, iters_per_epoch=2, device="cpu", workers=0, calib_method="max",
                select_images=2, no_eval_origin=True, learn_ranges=True, range_lr_mult=1e4, epochs=2)
    step = interrupt_step_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_qat.run_api(**base)
    monkeypatch.setattr(Trainer, "step", step)
    run = tmp_path / "runs" / "lr"
    out = train_qat.run_api(resume=str(run / "weights" / "qat_last.pt"), device="cpu", workers=0)
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    _, _, last = load_qat(run / "weights" / "qat_last.pt")
    assert last["opt"]["learn_ranges"] and len(last["optimizer"]["param_groups"]) == 2
    ptq = {k: float(v) for k, v in json_amax(run / "calibration.json").items()}
    moved = [k for k, v in last["qat"]["quantizer_state"].items() if k in ptq and v.numel() == 1
             and abs(float(v) - ptq[k]) > 1e-3 * ptq[k]]
    assert len(moved) >= len(ptq) // 2
    assert "learned activation ranges" in (run / "report.md").read_text().lower()


def json_amax(path):
    """{activation quantizer name: calibrated amax} from calibration.json."""
    import json
    return {r["name"]: r["amax"] for r in json.loads(path.read_text()) if r["kind"] == "input" and r["amax"]}


@pytest.mark.parametrize("layout", ["channels_last", "chunk"])
def test_gradients_do_not_depend_on_the_layout(layout):
    """QAT trains in channels_last and RepNCSPELAN4 quantizes chunk views: the LSQ dot products must pair
    the same elements whatever the strides of the input and of the incoming gradient."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 6, 5, 5, generator=gen) * 2
    upstream = torch.randn(2, 3, 5, 5, generator=gen)
    results = []
    for strided in (False, True):
        q = _quantizer(2.5)
        x = base.clone().requires_grad_(True)
        if strided and layout == "channels_last":
            xin, up = x[:, :3].contiguous(memory_format=torch.channels_last), upstream  # NCHW gradient arrives
        elif strided:
            xin, up = x.chunk(2, 1)[0], upstream.contiguous(memory_format=torch.channels_last)
        else:
            xin, up = x[:, :3].contiguous(), upstream
        (q(xin) * up).sum().backward()
        results.append((x.grad.clone(), q.log_amax.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=0)
    assert float(results[0][1].abs()) > 0
