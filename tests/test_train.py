"""train.py on tiny generated data with gelan-t: the loss goes down, --resume continues a killed run
from last.pt, checkpoints load through the safe loader, DDP under torchrun (gloo, CPU) trains."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train
from models.experimental import attempt_load, load_checkpoint
from utils.callbacks import Callbacks
from utils.demo_data import generate
from utils.general import UserError, yaml_load
from utils.plots import read_results_csv
from utils.torch_utils import save_atomic

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "models/detect/gelan-t.yaml")
# no augmentation and no warmup: every epoch sees the same images, so the loss must fall
STILL = dict(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, translate=0.0, scale=0.0, fliplr=0.0, mosaic=0.0, mixup=0.0,
             warmup_epochs=0.0)


def _hyp(**kw):
    h = yaml_load(ROOT / "data/hyps/hyp.scratch-high.yaml")
    h.update(kw)
    return h


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core machine two spinning threads per process cost more
    than they give (the DDP test's processes get OMP_NUM_THREADS=1 for the same reason)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(generate(tmp_path_factory.mktemp("tiny"), n_train=8, n_val=4, imgsz=96))


def _common(tmp_path, data, **kw):
    # batch 64 = the nominal batch: one optimizer step per iteration; 8 images -> 1 iteration per epoch
    base = dict(data=data, cfg=CFG, imgsz=64, batch_size=64, workers=0, device="cpu", project=str(tmp_path),
                noplots=True)
    base.update(kw)
    return base


def test_a_few_steps_lower_the_loss(tmp_path, data):
    opt = train.run(**_common(tmp_path, data, imgsz=96, epochs=4, noval=True, nosave=True, optimizer="Adam",
                              hyp=_hyp(lr0=0.001, **STILL), name="loss"))
    head, rows = read_results_csv(Path(opt.save_dir) / "results.csv")
    total = [sum(r[1:4]) for r in rows]  # train box + cls + dfl per epoch
    assert len(total) == 4 and all(np.isfinite(total))
    assert total[-1] < 0.97 * total[0], total
    assert len(opt.results) == 7


def test_nbs_sets_images_per_optimizer_step(tmp_path, data):
    """hyp `nbs` (default 64, upstream's fixed value): 8 images in batches of 4 are 2 optimizer steps
    with nbs 4, one with nbs 8 (gradients of 2 batches accumulated); data/hyps/hyp.demo.yaml uses it."""
    steps = {}
    for nbs in (4, 8):
        opt = train.run(**_common(tmp_path, data, batch_size=4, epochs=1, noval=True, optimizer="Adam",
                                  hyp=_hyp(nbs=nbs, **STILL), name=f"nbs{nbs}"))
        ckpt = load_checkpoint(Path(opt.save_dir) / "weights/last.pt")
        steps[nbs] = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4: {2}, 8: {1}}
    with pytest.raises(UserError, match="nbs=0 must be a positive integer"):
        train.run(**_common(tmp_path, data, epochs=1, hyp=_hyp(nbs=0)))
    assert yaml_load(ROOT / "data/hyps/hyp.demo.yaml")["nbs"] == 16
    train.load_hyp(ROOT / "data/hyps/hyp.demo.yaml")  # a complete hyp file


class _Killed(Exception):
    pass


def test_resume_continues_a_killed_run(tmp_path, data):
    def kill_after_first_save(last, epoch, *args):
        if epoch == 0:
            raise _Killed  # as if the process died right after writing last.pt

    mosaic = {}  # dataset.mosaic per epoch: --close-mosaic 1 turns it off for the last epoch, also after resume

    def on_start(ctx):
        cb.run_state = ctx

    def on_epoch(epoch):
        mosaic[epoch] = cb.run_state.dataset.mosaic

    cb = Callbacks()
    cb.register_action("on_model_save", kill_after_first_save)
    cb.register_action("on_train_start", on_start)
    cb.register_action("on_train_epoch_start", on_epoch)
    with pytest.raises(_Killed):
        train.run(**_common(tmp_path, data, epochs=2, hyp=_hyp(**STILL), name="run", noplots=False, close_mosaic=1),
                  callbacks=cb)
    run_dir = tmp_path / "run"
    last = run_dir / "weights" / "last.pt"
    ck = load_checkpoint(last)  # the safe loader reads what train.py writes
    assert ck["epoch"] == 0 and ck["updates"] == 1 and ck["git"] is None and isinstance(ck["date"], str)
    assert ck["model"].model[0].conv.weight.dtype == torch.float16 and ck["ema"] is not None
    assert ck["opt"]["epochs"] == 2 and ck["opt"]["hyp"]["box"] == 7.5
    saved_state = ck["optimizer"]["state"]
    assert saved_state and all("momentum_buffer" in s for s in saved_state.values())
    assert not list(run_dir.glob("weights/.*.tmp"))
    assert len(read_results_csv(run_dir / "results.csv")[1]) == 1

    seen = {}

    def on_resumed(ctx):
        cb.run_state = ctx
        seen.update(start=ctx.start_epoch, updates=ctx.ema.updates, best=ctx.best_fitness,
                    state=copy.deepcopy(ctx.optimizer.state_dict()["state"]),  # training updates it in place
                    lr=[g["lr"] for g in ctx.optimizer.param_groups])

    cb = Callbacks()
    cb.register_action("on_train_start", on_resumed)
    cb.register_action("on_train_epoch_start", on_epoch)
    opt = train.run(resume=str(last), device="cpu", workers=0, callbacks=cb)
    assert mosaic == {0: True, 1: False}
    assert Path(opt.save_dir) == run_dir and opt.epochs == 2 and opt.name == "run"  # the run's own opt
    assert seen["start"] == 1 and seen["updates"] == 1 and seen["best"] == ck["best_fitness"]
    assert seen["lr"] == [g["lr"] for g in ck["optimizer"]["param_groups"]]
    assert set(seen["state"]) == set(saved_state)
    for k, s in saved_state.items():  # momentum buffers restored, not restarted from zero
        torch.testing.assert_close(seen["state"][k]["momentum_buffer"], s["momentum_buffer"])

    ck2 = load_checkpoint(last)
    assert ck2["epoch"] == 1 and ck2["updates"] == 2
    head, rows = read_results_csv(run_dir / "results.csv")
    assert [int(r[0]) for r in rows] == [0, 1] and head[1] == "train/box_loss"
    for f in ("hyp.yaml", "opt.yaml", "results.png", "results.json", "results.md", "weights/best.pt"):
        assert (run_dir / f).is_file(), f
    model = attempt_load(run_dir / "weights" / "best_striped.pt")
    assert model.names == dict(enumerate(yaml_load(data)["names"]))
    stripped = load_checkpoint(run_dir / "weights" / "last_striped.pt")
    assert stripped["optimizer"] is None and stripped["epoch"] == -1

    with pytest.raises(UserError, match="finished, nothing to resume"):
        train.run(resume=str(last), device="cpu", workers=0)
    with pytest.raises(UserError, match="no training state"):
        train.run(resume=str(run_dir / "weights" / "last_striped.pt"), device="cpu", workers=0)


def test_killed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    f = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, f)

    def dies_mid_write(obj, f, *a, **k):  # torch.save gets the temporary path (or a file handle)
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a zip")
        else:
            Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, f)
    monkeypatch.undo()
    assert torch.load(f, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_bad_options_are_user_errors(tmp_path, data):
    with pytest.raises(UserError, match="--cfg"):
        train.run(**_common(tmp_path, data, cfg="", epochs=1))
    with pytest.raises(UserError, match="misses lr0"):
        train.run(**_common(tmp_path, data, epochs=1, hyp={k: v for k, v in _hyp().items() if k != "lr0"}))
    with pytest.raises(UserError, match="not a multiple"):
        train.run(**_common(tmp_path, data, epochs=1, imgsz=70))
    with pytest.raises(UserError, match="unknown option"):
        train.run(epoch=3)
    with pytest.raises(UserError, match="no .*last.pt"):
        train.run(resume=True, project=str(tmp_path / "empty"))
    opt = train.parse_opt(["--resume", "--cfg", CFG, "--optimizer", "AdamW", "--freeze", "3"])
    assert opt.resume is True and opt.optimizer == "AdamW" and opt.freeze == [3]
    assert opt.hyp.endswith("hyp.scratch-high.yaml") and opt.project.endswith("runs/train")


def test_cli_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "nope.yaml"), "--cfg", CFG,
                        "--project", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: data yaml") and "Traceback" not in r.stderr


def test_ddp_two_cpu_processes(tmp_path, data):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump(_hyp(lr0=0.001, warmup_epochs=0.0)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--data", data, "--cfg", CFG, "--imgsz", "64", "--batch-size", "64",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--hyp", str(hyp), "--project", str(tmp_path),
           "--name", "ddp", "--noplots"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "DDP: 2 processes, backend gloo" in out
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["ddp"]  # one run folder for both ranks
    ck = load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")
    assert ck["epoch"] == 0 and ck["updates"] == 1  # EMA (rank 0) saw the one optimizer step
    assert len(read_results_csv(tmp_path / "ddp" / "results.csv")[1]) == 1


def test_schedules_and_early_stopping():
    from utils.torch_utils import EarlyStopping, intersect_dicts, linear_lr, one_cycle, one_flat_cycle

    lin, cos, flat = linear_lr(0.01, 10), one_cycle(1, 0.01, 10), one_flat_cycle(1, 0.01, 10)
    assert lin(0) == 1 and lin(10) == pytest.approx(0.01) and lin(5) == pytest.approx(0.505)
    assert cos(0) == 1 and cos(10) == pytest.approx(0.01) and cos(5) == pytest.approx(0.505)
    assert flat(0) == flat(5) == 1 and flat(10) == pytest.approx(0.01) and 0.01 < flat(8) < 1
    stop = EarlyStopping(patience=2)
    assert [stop(e, f) for e, f in enumerate([0.1, 0.2, 0.15, 0.19])] == [False, False, False, True]
    assert not any(EarlyStopping(patience=0)(e, 0.0) for e in range(50))  # 0 = never stop
    a = {"x.weight": torch.zeros(2, 3), "y.bias": torch.zeros(4), "z": torch.zeros(1)}
    b = {"x.weight": torch.ones(2, 3), "y.bias": torch.ones(5)}
    assert list(intersect_dicts(a, b)) == ["x.weight"]


def test_bad_hyp_and_freeze_are_one_line_and_leave_no_run_folder(tmp_path, data):
    """Issue 16.9: --hyp invalid YAML / a missing key / non-numeric or non-finite values, and
    --freeze beyond the model's layers: one-line errors before the run folder is made."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr0: [0.01\nbox: 7.5\n")
    cases = [(dict(hyp=str(bad_yaml)), "not valid YAML"),
             (dict(hyp={k: v for k, v in _hyp().items() if k != "box"}), "misses box"),
             (dict(hyp=_hyp(box="big")), "box='big' is not a finite number"),
             (dict(hyp=_hyp(lr0=float("inf"))), "lr0=inf is not a finite number"),
             (dict(hyp=_hyp(lrf=float("nan"))), "lrf=nan is not a finite number"),
             (dict(hyp=_hyp(lr0=0.0)), "lr0=0.0 must be > 0"),
             (dict(freeze=[999]), "--freeze 999: the model has layers 0-"),
             (dict(freeze=[3, 999]), "--freeze 3 999")]
    for kw, message in cases:
        project = tmp_path / "runs"
        with pytest.raises(UserError, match=message.replace("[", r"\[")) as e:
            train.run(**_common(project, data, epochs=1, **kw))
        assert "\n" not in str(e.value)
        assert not project.exists() or not any(project.iterdir()), (kw, list(project.rglob("*")))


def test_nan_loss_stops_before_any_checkpoint(tmp_path, data, monkeypatch):
    """Issue 16.4: a non-finite loss stops training with one line; no checkpoint is written from it."""
    import utils.loss_tal
    real = utils.loss_tal.ComputeLoss.__call__

    def nan_loss(self, *a, **k):
        loss, items = real(self, *a, **k)
        return loss * float("nan"), items

    monkeypatch.setattr(utils.loss_tal.ComputeLoss, "__call__", nan_loss)
    with pytest.raises(UserError, match="training diverged: the loss is nan at epoch 0") as e:
        train.run(**_common(tmp_path, data, epochs=2, hyp=_hyp(**STILL)))
    assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("*.pt"))
