"""qat.finetune: distillation steps lower the loss, the det/both losses, schedule, checkpoints,
Ctrl-C and resume."""
import pytest
import torch

from qat.calibrate import calibrate
from qat.checkpoint import load_qat, save_qat
from qat.compat import UserError
from qat.finetune import (FinetuneOptions, HeadIO, LayerOutputs, Trainer, block_layers, cosine_lr, distill_loss,
                          finetune, kd_loss, learning_rate, supervised_layers)
from qat.quantize import quantize_model
from qat.settings import QuantSettings
from qat_testkit import IMGSZ, fp32_model, interrupt_step_at, noise_images

HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5, "cls_pw": 1.0}


def _pair(cfg="gelan-t", weight_bits=8):
    fp32 = fp32_model(cfg)
    q = quantize_model(fp32_model(cfg), QuantSettings(weight_bits=weight_bits))
    calibrate(q, [noise_images(4, seed=3)], show=False)
    fp32.hyp = q.hyp = dict(HYP)
    return q, fp32


def _batch(seed=0, n=2):
    imgs = (noise_images(n, seed=seed) * 255).to(torch.uint8)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    return imgs, targets, [f"im{i}.jpg" for i in range(n)], None


def _distill(q, fp32, x, stride=1):
    layers = supervised_layers(q, stride)
    hs, ht = LayerOutputs(q, layers), LayerOutputs(fp32, layers)
    with torch.no_grad():
        q.train()(x)
        fp32.train()(x)
    loss = float(distill_loss(hs.pop(), ht.pop()))
    hs.remove()
    ht.remove()
    return loss


def test_qat_steps_lower_distillation_loss():
    q, fp32 = _pair(weight_bits=7)  # the coarser grid leaves more to recover
    batch = _batch()
    x = batch[0].float() / 255
    before = _distill(q, fp32, x)
    # the weights' straight-through path alone (learned ranges: tests/qat/test_learned_ranges.py)
    trainer = Trainer(q, fp32, FinetuneOptions(lr=1e-5, learn_ranges=False))
    steps = [trainer.step(batch, 1e-5)["distill"] for _ in range(10)]
    trainer.close()
    after = _distill(q, fp32, x)
    assert before > 0 and after < 0.85 * before, (before, steps, after)
    assert all(p.requires_grad for n, p in q.named_parameters() if ".dfl." not in n)


def test_supervised_layers_and_schedule():
    q, _ = _pair()
    n = len(q.model)
    assert supervised_layers(q, 1) == list(range(n))
    assert supervised_layers(q, 5) == [0, 5, 10, 15, 20, n - 1]
    yolo = fp32_model("yolov9-c")
    assert 0 not in supervised_layers(yolo, 1)  # Silence passes its input through
    o = FinetuneOptions(lr=1e-4, lrf=0.01)
    assert cosine_lr(o, 0, 100) == pytest.approx(1e-4) and cosine_lr(o, 100, 100) == pytest.approx(1e-6)
    assert 1e-6 < cosine_lr(o, 50, 100) < 1e-4


@pytest.mark.parametrize("loss", ["det", "both"])
def test_detection_losses(loss):
    q, fp32 = _pair()
    trainer = Trainer(q, fp32, FinetuneOptions(loss=loss, lr=1e-4))
    items = trainer.step(_batch(), 1e-4)
    trainer.close()
    assert items["det"] > 0 and (("distill" in items) == (loss == "both"))
    del q.hyp
    with pytest.raises(UserError, match="--hyp"):
        Trainer(q, fp32, FinetuneOptions(loss="det"))


def test_bad_options():
    for kw, msg in [({"loss": "kl"}, "--loss kl"), ({"optimizer": "Lion"}, "--optimizer Lion"),
                    ({"supervision_stride": 0}, "--supervision-stride"), ({"lr": 0}, "--lr")]:
        with pytest.raises(UserError, match=msg):
            FinetuneOptions(**kw).validate()


def test_finetune_checkpoints_interrupt_and_resume(tmp_path, monkeypatch):
    q, fp32 = _pair()
    loader = [_batch(seed=s) for s in range(3)]
    maps = iter([0.2, 0.1, 0.3])
    val_fn = lambda m: {"mp": 0.5, "mr": 0.5, "map50": 0.5, "map": next(maps)}  # noqa: E731
    settings = QuantSettings()
    opts = FinetuneOptions(epochs=2, iters_per_epoch=3, lr=1e-4, save_dir=tmp_path, save_period=2, settings=settings,
                           extra={"opt": {"imgsz": IMGSZ}}, show=False)

    step = interrupt_step_at(monkeypatch, 5)  # Ctrl-C in the 5th iteration (epoch 2, iteration 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(q, fp32, loader, val_fn, opts)
    monkeypatch.setattr(Trainer, "step", step)
    _, _, last = load_qat(tmp_path / "qat_last.pt")
    _, _, best = load_qat(tmp_path / "qat_best.pt")
    assert (last["epoch"], last["iteration"]) == (1, 1) and len(last["history"]) == 1
    assert best["epoch"] == 1 and best["best_fitness"] == pytest.approx(0.2) and last["opt"] == {"imgsz": IMGSZ}
    assert last["optimizer"]["state"]  # momentum buffers kept for resume

    model, _, ckpt = load_qat(tmp_path / "qat_last.pt")
    resume = {k: ckpt[k] for k in ("epoch", "iteration", "optimizer", "best_fitness", "history")}
    opts.resume = resume
    history = finetune(model, fp32, loader, val_fn, opts)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["map"] == pytest.approx(0.1)
    _, _, best = load_qat(tmp_path / "qat_best.pt")
    assert best["epoch"] == 1  # epoch 2 (0.1) did not beat epoch 1 (0.2)


def test_an_epoch_must_beat_the_start_fitness(tmp_path):
    """start_fitness (the pipeline passes the PTQ model's mAP50-95): an epoch below it does not
    replace qat_best.pt; one above it does."""
    q, fp32 = _pair()
    loader = [_batch(seed=s) for s in range(2)]
    maps = iter([0.3, 0.5])
    val_fn = lambda m: {"mp": 0.5, "mr": 0.5, "map50": 0.5, "map": next(maps)}  # noqa: E731
    opts = FinetuneOptions(epochs=2, iters_per_epoch=1, lr=1e-4, save_dir=tmp_path, settings=QuantSettings(),
                           start_fitness=0.4, show=False)
    opts.epochs = 1
    finetune(q, fp32, loader, val_fn, opts)
    assert not (tmp_path / "qat_best.pt").exists() and (tmp_path / "qat_last.pt").exists()
    _, _, last = load_qat(tmp_path / "qat_last.pt")
    opts.epochs = 2
    opts.resume = {k: last[k] for k in ("epoch", "iteration", "optimizer", "best_fitness", "history")}
    assert opts.resume["best_fitness"] == pytest.approx(0.4)  # the start fitness is carried into a resume
    finetune(q, fp32, loader, val_fn, opts)
    _, _, best = load_qat(tmp_path / "qat_best.pt")
    assert best["epoch"] == 2 and best["best_fitness"] == pytest.approx(0.5)


def test_non_finite_options_are_refused():
    """Issue 16.4: inf/NaN learning rates and loss weights train a NaN model: refused up front."""
    nan, inf = float("nan"), float("inf")
    for kw, msg in [({"lr": inf}, "--lr"), ({"lr": nan}, "--lr"), ({"lrf": nan}, "--lrf"),
                    ({"det_weight": nan}, "--det-weight"), ({"det_weight": -1.0}, "--det-weight"),
                    ({"weight_decay": inf}, "--weight-decay"), ({"momentum": nan}, "--momentum")]:
        with pytest.raises(UserError, match=msg):
            FinetuneOptions(**kw).validate()


@pytest.mark.parametrize("cause", ["huge lr", "nan loss"])
def test_diverging_training_stops_and_never_saves_nan(tmp_path, monkeypatch, cause):
    """Issue 16.4: a learning rate so large that the activations overflow (or any NaN loss) stops the
    run with one line, and neither qat_best.pt nor qat_last.pt is replaced by a non-finite model."""
    q, fp32 = _pair()
    loader = [_batch(seed=s) for s in range(3)]
    save_qat(tmp_path / "qat_best.pt", q, QuantSettings())  # the pipeline's PTQ starting point
    before = (tmp_path / "qat_best.pt").read_bytes()
    opts = FinetuneOptions(epochs=2, iters_per_epoch=3, lr=1e30 if cause == "huge lr" else 1e-4,
                           loss="distill" if cause == "huge lr" else "det", save_dir=tmp_path, save_period=1,
                           settings=QuantSettings(), show=False)
    if cause == "nan loss":  # e.g. a label the loss cannot take: the second step's loss is NaN
        import utils.loss_tal
        calls = {"n": 0}
        real = utils.loss_tal.ComputeLoss.__call__

        def second_is_nan(self, *a, **k):
            calls["n"] += 1
            loss, items = real(self, *a, **k)
            return (loss * float("nan") if calls["n"] == 2 else loss), items

        monkeypatch.setattr(utils.loss_tal.ComputeLoss, "__call__", second_is_nan)
    with pytest.raises(UserError, match=r"epoch 1, iteration \d: QAT diverged") as e:
        finetune(q, fp32, loader, lambda m: {"mp": 0, "mr": 0, "map50": 0, "map": 0}, opts)
    assert "\n" not in str(e.value) and "--lr" in str(e.value)
    assert (tmp_path / "qat_best.pt").read_bytes() == before
    for f in tmp_path.glob("qat_*.pt"):  # whatever was written holds finite weights
        model, _, _ = load_qat(f)
        assert all(torch.isfinite(p).all() for p in model.parameters()), f


def test_recipes_schedules_and_targets():
    """Each recipe's defaults, its distillation target, and the warm-up / plateau schedules."""
    o = FinetuneOptions(recipe="blocks").validate()
    assert (o.optimizer, o.lr, o.schedule) == ("Adam", 1e-5, "plateau")
    assert [learning_rate(o, s, 100) for s in (0, 29, 30, 79, 80, 99)] == pytest.approx(
        [1e-6, 1e-6, 1e-5, 1e-5, 1e-6, 1e-6])
    o = FinetuneOptions(recipe="kd", lr=1e-4, optimizer="SGD").validate()  # explicit options win
    assert (o.optimizer, o.lr, o.warmup) == ("SGD", 1e-4, 0.05)
    assert learning_rate(o, 0, 100) == pytest.approx(1e-6) and learning_rate(o, 5, 100) == pytest.approx(
        cosine_lr(o, 5, 100))
    assert learning_rate(o, 2, 100) < learning_rate(o, 4, 100) < 1e-4
    q, _ = _pair()
    blocks = block_layers(q)
    assert len(q.model) - 1 not in blocks and 0 in blocks
    assert all(any(True for _ in q.model[i].parameters()) for i in blocks)
    with pytest.raises(UserError, match="--recipe fast"):
        FinetuneOptions(recipe="fast").validate()


def test_recipe_layers_learns_ranges_by_default():
    """The default recipe trains the activation ranges (lr 3e-2 on log(amax) whatever --lr); other
    recipes do not unless asked, an explicit --no-learn-ranges / --range-lr-mult wins, and
    train_qat's opt says what ran."""
    import train_qat
    from qat.options import finetune_options, settings_from_opt

    o = FinetuneOptions().validate()
    assert (o.recipe, o.lr, o.learn_ranges) == ("layers", 1e-6, True)
    assert o.lr * o.range_lr_mult == pytest.approx(3e-2)
    o = FinetuneOptions(lr=1e-3).validate()  # the ranges' lr stays 3e-2 when --lr changes
    assert o.lr * o.range_lr_mult == pytest.approx(3e-2)
    o = FinetuneOptions(recipe="kd").validate()
    assert not o.learn_ranges and o.lr * o.range_lr_mult == pytest.approx(3e-2)
    o = FinetuneOptions(learn_ranges=False, range_lr_mult=10.0).validate()
    assert (o.learn_ranges, o.range_lr_mult) == (False, 10.0)
    opt = train_qat.parse_opt([])
    f = finetune_options(opt, ".", settings_from_opt(opt))
    assert f.learn_ranges and opt.learn_ranges is True and opt.range_lr_mult == pytest.approx(30000.0)
    opt = train_qat.parse_opt(["--no-learn-ranges"])
    assert not finetune_options(opt, ".", settings_from_opt(opt)).learn_ranges and opt.learn_ranges is False


def test_kd_loss_is_zero_for_the_teacher_and_trains():
    q, fp32 = _pair(weight_bits=7)
    x = _batch()[0].float() / 255
    hs, ht = HeadIO(q), HeadIO(fp32)
    with torch.no_grad():
        q.train()(x)
        fp32.train()(x)
        parts = kd_loss(hs.pop(), ht.pop(), 16)
        fp32(x)
        same = ht.pop()
        self_parts = kd_loss(same, same, 16)
    hs.remove()
    ht.remove()
    assert all(float(v) > 0 for v in parts.values())
    assert all(abs(float(v)) < 1e-6 for v in self_parts.values())
    trainer = Trainer(q, fp32, FinetuneOptions(recipe="kd", lr=1e-4))
    steps = [trainer.step(_batch(), 1e-4)["distill"] for _ in range(8)]
    trainer.close()
    assert steps[-1] < steps[0], steps


def test_eval_period_and_diagnostics(tmp_path):
    """Evaluations every eval_period iterations, each with the INT8 weights changed since PTQ and
    per-layer errors; lr 1e-12 changes no integer, lr 1e-3 changes many."""
    loader = [_batch(seed=s) for s in range(3)]
    val_fn = lambda m: {"mp": 0.5, "mr": 0.5, "map50": 0.5, "map": 0.1}  # noqa: E731
    for lr, moved in ((1e-12, False), (1e-3, True)):
        q, fp32 = _pair()
        opts = FinetuneOptions(epochs=1, iters_per_epoch=4, lr=lr, eval_period=2, save_dir=tmp_path,
                               settings=QuantSettings(), show=False)
        history = finetune(q, fp32, loader, val_fn, opts)
        assert [(h["epoch"], h["iteration"], h["step"]) for h in history] == [(0, 2, 2), (1, 0, 4)]
        assert all(h["int_total"] > 0 and len(h["layer_error"]) == len(q.model) for h in history)
        assert (history[-1]["int_changed"] > 0) == moved, history[-1]["int_changed"]
        assert all(e >= 0 for e in history[-1]["layer_error"])


def test_training_in_channels_last_matches_and_hands_back_the_default_layout():
    """The Trainer runs student and teacher in channels_last (faster convolutions on the CPU): its loss is
    the one computed in the default layout, and close() gives both models back in the default layout
    (checkpoints, export)."""
    q, fp32 = _pair()
    batch = _batch()
    opts = FinetuneOptions(lr=1e-5)
    expected = _distill(q, fp32, batch[0].float() / 255, opts.supervision_stride)
    trainer = Trainer(q, fp32, opts)
    conv_weights = [p for p in list(q.parameters()) + list(fp32.parameters()) if p.dim() == 4 and p.shape[-1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                for p in conv_weights)
    got = trainer.step(batch, 1e-5)["distill"]
    trainer.close()
    assert got == pytest.approx(expected, rel=1e-4)
    assert all(p.is_contiguous() for p in list(q.parameters()) + list(fp32.parameters()))


def test_kd_class_term_stays_positive_for_tiny_scores():
    """An untrained head's class scores sit near sigmoid(-12): the class KL must match a float64 binary KL for a
    student that differs (a difference of two BCE means rounds to < 0 there) and be exactly 0 for the teacher."""
    g = torch.Generator().manual_seed(0)
    reg_max, nc, T = 16, 6, 2.0
    tc = -24 + 0.2 * torch.randn(2, nc, 8, 8, generator=g)  # / T: the -12 +- 0.1 of an untrained head
    sc = tc + 2e-2 * torch.randn(2, nc, 8, 8, generator=g)
    box = torch.randn(2, 4 * reg_max, 8, 8, generator=g)
    t, s = torch.cat([box, tc], 1), torch.cat([box, sc], 1)
    feats = [torch.randn(2, 4, 8, 8, generator=g)]
    p, q = torch.sigmoid(tc.double() / T), torch.sigmoid(sc.double() / T)
    want = float((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()) * T * T
    got = float(kd_loss((feats, [s]), (feats, [t]), reg_max, T)["cls"])
    assert want > 0 and got == pytest.approx(want, rel=0.05)
    assert float(kd_loss((feats, [t]), (feats, [t]), reg_max, T)["cls"]) == 0
