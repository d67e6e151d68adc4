"""The QAT stages end to end, shared by `train_qat.py` and `train.py --qat` (run_from_train).

    FP32 checkpoint -> evaluate (FP32 row) -> quantize_model -> calibrate (calibration.md/json;
    --calib-method auto: every rule's amax from one histogram pass, the best PTQ mAP50-95 on the
    selection split wins, calibration_selection.md/json)
    [-> --auto-skip: per-layer sensitivity, layers kept float, re-quantize + re-calibrate]
    -> evaluate (PTQ row) -> finetune (QAT, --recipe, evaluated on the selection split every
    --eval-period iterations) -> qat_best.pt evaluated on val -> report.md / report.json

Selection never uses the reported split: choices (calibration rule, best QAT evaluation) are made
on `--select-split`, else on the data yaml's `select:` split, else on `--select-images` train images
held out of training and calibration (lists in runs/qat/<name>/splits/), evaluated as deployed (square
letterbox, qat.evaluation.make_select_loader); qat_best.pt is the best of the PTQ model and every
QAT evaluation on that split, and the report shows its numbers on val.

Run directory runs/qat/<name>/: opt.yaml, calibration.md/json, weights/qat_best.pt (by mAP50-95)
and weights/qat_last.pt (every epoch and every --save-period iterations; --resume continues from
it; Ctrl-C writes it), report.md/json: FP32 vs PTQ vs QAT with deltas. `--epochs 0` stops after
calibration and saves the post-training-quantized model as qat_best.pt.

Over 300 lines: the run's steps (PTQ, auto calibration choice, QAT, resume, auto-skip,
sensitivity, train.py's hook) each short; options, data and reports live in their own modules.
"""

import argparse
import json
import math
from copy import deepcopy
from pathlib import Path

import torch

from qat.compat import UserError, atomic_output, init_seeds, load_checkpoint
from qat.distributed import LOCAL_RANK, RANK, WORLD_SIZE, barrier, broadcast, is_main_rank
from qat.evaluation import (METRICS, FirstBatches, check_demo_weights, check_nc, load_data, load_fp32, make_loaders,
                            make_select_loader, make_val_fn, selection_split)
from qat.options import check_opt, default_opt, finetune_options, load_hyp, plain_opt
from qat.report import best_note, method_note, selection_note, write_calibration_selection, write_report
from qat.settings import QuantSettings
from utils.cli import newest_file
from utils.general import LOGGER, check_img_size, colorstr, increment_path, yaml_save


def choose_calibration(qmodel, settings, select_fn, save_dir):
    """--calib-method auto: evaluate every candidate rule's amax (from the kept histograms) on the
    selection split, load the best (the first of equals, cheapest first) -> settings naming it.
    Rank 0 evaluates; every rank loads the same candidate (their histograms are merged)."""
    from qat.calibrate import auto_candidates, candidate_amaxes, free_histograms, load_amaxes
    candidates = auto_candidates()
    amaxes = candidate_amaxes(qmodel, candidates)
    table = None
    if is_main_rank():
        table = []
        for label, method, pct in candidates:
            load_amaxes(qmodel, amaxes[label])
            LOGGER.info(f"{colorstr('calibrate: ')}candidate {label}")
            table.append({"candidate": label, "method": method, "percentile": pct, **select_fn(qmodel)})
    table = broadcast(table)
    best = max(table, key=lambda r: r["map"])  # max() keeps the first of equal values
    load_amaxes(qmodel, amaxes[best["candidate"]])
    free_histograms(qmodel)
    chosen = QuantSettings.from_dict({**settings.to_dict(), "calib_method": best["method"],
                                      "percentile": best["percentile"] or settings.percentile})
    qmodel.qat["settings"] = chosen.to_dict()
    if is_main_rank():
        write_calibration_selection(table, best, save_dir)
    return chosen, table


def quantize_and_calibrate(fp32, settings, loader, n_batches, device, save_dir=None, select_fn=None):
    """A quantized, calibrated copy of `fp32` -> (model, settings). --calib-method auto needs
    `select_fn` (rank 0) and returns the settings of the rule it chose; calibration tables in save_dir."""
    from qat.calibrate import calibrate, write_summary
    from qat.quantize import quantize_model, quantizer_summary
    qmodel = quantize_model(deepcopy(fp32), settings)
    n_groups = len(qmodel.qat["groups"])
    LOGGER.info(f"{colorstr('quantize: ')}{settings}; {n_groups} groups of quantization points share one quantizer")
    per_rank = math.ceil(n_batches / max(WORLD_SIZE, 1))
    summary = calibrate(qmodel, FirstBatches(loader, per_rank), settings, device, show=is_main_rank())
    if settings.calib_method == "auto":
        settings, _ = choose_calibration(qmodel, settings, select_fn, save_dir)
        summary = quantizer_summary(qmodel)
    if save_dir is not None and is_main_rank():
        f = write_summary(summary, save_dir)
        LOGGER.info(f"{colorstr('calibrate: ')}{min(per_rank, len(loader))} batches x {max(WORLD_SIZE, 1)} rank(s), "
                    f"{settings.calib_method}; amax table {f}")
    return qmodel, settings


def resume_options(opt):
    """--resume: (the saved run's options with this call's device/workers/trusted, the qat_last.pt to
    continue from), everything checked before anything is written; (opt, None) without --resume."""
    if not opt.resume:
        return opt, None
    last = newest_file(opt.project, "*/weights/qat_last.pt") if opt.resume is True else Path(opt.resume)
    if last is None:
        raise UserError(f"--resume: no */weights/qat_last.pt under {opt.project}; pass the qat_last.pt to resume")
    if not last.is_file():
        raise UserError(f"--resume {opt.resume}: file not found; pass a run's weights/qat_last.pt")
    resume = last
    from qat.checkpoint import is_qat_checkpoint, validate_qat_entry
    ckpt = load_checkpoint(last, trusted=opt.trusted)
    if not is_qat_checkpoint(ckpt):
        raise UserError(f"--resume {last}: not a QAT checkpoint (no 'qat' entry): pass a train_qat.py run's "
                        f"weights/qat_last.pt (a train.py run continues with train.py --resume)")
    validate_qat_entry(ckpt, last)
    saved = ckpt.get("opt")
    del ckpt
    if not isinstance(saved, dict):
        raise UserError(f"--resume {last}: the checkpoint holds no 'opt' to continue with")
    keep = {k: getattr(opt, k) for k in ("device", "workers", "trusted")}
    opt = argparse.Namespace(**{**vars(default_opt()), **saved, **keep, "resume": str(last),
                                "save_dir": str(last.parent.parent)})
    return opt, resume


def _run_dir(opt):
    """The run folder: the resumed run's, else a new project/name chosen by rank 0 for all ranks."""
    if getattr(opt, "save_dir", None):
        return Path(opt.save_dir)
    fresh = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)) if is_main_rank() else None
    return Path(broadcast(fresh))


def _fp32_model(opt, model, device):
    """(fused FP32 eval model, its checkpoint's opt): --weights, or the model train.py --qat built."""
    if model is None:
        return load_fp32(opt.weights, device, opt.trusted)
    fp32 = deepcopy(model).float().to(device)
    if hasattr(fp32, "fuse"):
        with torch.no_grad():  # upstream's fuse_conv_and_bn copy_()s into new weights: no graph to them
            fp32.fuse()
    return fp32.eval(), {}


def _resumed_state(resume, device, opt):
    """--resume: (quantized model, settings, val rows, selection rows, the finetune loop's state)
    from qat_last.pt."""
    from qat.checkpoint import load_qat

    qmodel, settings, ckpt = load_qat(resume, device, trusted=opt.trusted)
    if int(ckpt.get("epoch", 0)) >= opt.epochs and not ckpt.get("iteration"):
        raise UserError(f"--resume {resume}: that run already finished its {opt.epochs} epochs")
    LOGGER.info(f"{colorstr('resume: ')}{resume} at epoch {ckpt.get('epoch')}, iteration {ckpt.get('iteration')}")
    rows = {k: v for k, v in (ckpt.get("rows") or {}).items() if k != "QAT"}
    state = {k: ckpt.get(k) for k in ("epoch", "iteration", "optimizer", "best_fitness", "history")}
    return qmodel, settings, rows, dict(ckpt.get("select_rows") or {}), state


def run(opt, model=None, data_dict=None, device=None, write_opt=True):
    """Run the QAT pipeline with `opt` (train_qat.py's options). `model`: an FP32 model to start
    from instead of --weights (train.py --qat); `data_dict`: an already checked data dict.
    Returns {'save_dir', 'rows', 'history', 'best', 'last', 'settings', 'model'}."""
    from qat.checkpoint import save_qat
    from qat.finetune import finetune
    from utils.torch_utils import select_device

    main = is_main_rank()
    opt, resume = resume_options(opt)
    settings = check_opt(opt)
    if model is None:
        check_demo_weights(str(opt.weights))
    device = device or select_device(opt.device, batch_size=opt.batch_size)
    init_seeds(opt.seed + 1 + RANK)

    save_dir = _run_dir(opt)
    opt.save_dir = str(save_dir)
    wdir = save_dir / "weights"

    data = data_dict or load_data(opt.data)
    fp32, ckpt_opt = _fp32_model(opt, model, device)
    check_nc(fp32, data, opt.weights or "the model", opt.data if isinstance(opt.data, str) else "the data")
    stride = max(int(max(fp32.stride)), 32)
    imgsz = check_img_size(int(opt.imgsz or ckpt_opt.get("imgsz") or 640), stride)
    opt.imgsz = imgsz
    hyp = load_hyp(opt.hyp, required=("box", "cls", "dfl") if getattr(opt, "loss", "distill") != "distill" else ())
    fp32.hyp = hyp
    train_src, select_src = selection_split(data, opt, save_dir)
    train_loader, calib_loader, val_loader = make_loaders(dict(data, train=train_src), imgsz, stride, opt, hyp,
                                                          rank=LOCAL_RANK)
    if main:  # only now: a run that fails on its inputs leaves no run folder behind
        wdir.mkdir(parents=True, exist_ok=True)
        if write_opt:
            with atomic_output(save_dir / "opt.yaml") as tmp:  # (upstream's yaml_save, in a clone, is not atomic)
                yaml_save(tmp, plain_opt(opt))
    val_fn = make_val_fn(data, val_loader, imgsz, opt.batch_size * 2, opt.val_batches) if main else None
    select_fn = make_val_fn(data, make_select_loader(select_src, int(data["nc"]), imgsz, stride, opt, hyp), imgsz,
                            opt.batch_size * 2) if main else None

    def evaluate(m, label, fn=None):
        LOGGER.info(f"{colorstr('evaluate: ')}{label}")
        return (fn or val_fn)(m)

    rows, select_rows, history, fopts = {}, {}, [], finetune_options(opt, save_dir, settings)
    if resume is not None:
        qmodel, settings, rows, select_rows, fopts.resume = _resumed_state(resume, device, opt)
        fopts.settings = settings
    else:
        qmodel, settings = _post_training_quantization(opt, fp32, settings, calib_loader, device, save_dir,
                                                       evaluate, select_fn, rows, select_rows)
        fopts.settings = settings

    fopts.extra = {"opt": plain_opt(opt), "rows": rows, "select_rows": select_rows}
    if opt.epochs == 0:
        if main:
            extra = dict(fopts.extra, epoch=0, iteration=0, best_fitness=rows.get("PTQ", {}).get("map", 0.0))
            save_qat(wdir / "qat_best.pt", qmodel, settings, extra)
            save_qat(wdir / "qat_last.pt", qmodel, settings, extra)
    else:
        if main and fopts.resume is None:
            # qat_best.pt starts as the calibrated model: a QAT evaluation replaces it only with a higher
            # mAP50-95 on the selection split, so fine-tuning never hands back something worse there
            fopts.start_fitness = select_rows["PTQ"]["map"]
            save_qat(wdir / "qat_best.pt", qmodel, settings,
                     dict(fopts.extra, epoch=0, iteration=0, best_fitness=fopts.start_fitness, history=[]))
        history = finetune(qmodel, fp32, train_loader, select_fn, fopts)
        if main:
            rows["QAT"], select_rows["QAT"] = _chosen_rows(wdir / "qat_best.pt", rows, select_rows, history,
                                                           device, evaluate, opt.trusted)
    if main:
        with atomic_output(save_dir / "history.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1))
        if rows:
            write_report(rows, save_dir, note=best_note(wdir / "qat_best.pt") + method_note(opt)
                         + selection_note(select_rows))
        LOGGER.info(f"{colorstr('QAT: ')}results in {save_dir}; weights {wdir / 'qat_best.pt'}")
    barrier()
    return {"save_dir": save_dir, "rows": rows, "select_rows": select_rows, "history": history,
            "best": wdir / "qat_best.pt", "last": wdir / "qat_last.pt", "settings": settings, "model": qmodel}


def _post_training_quantization(opt, fp32, settings, calib_loader, device, save_dir, evaluate, select_fn, rows,
                                select_rows):
    """FP32 row, quantize + calibrate (+ --auto-skip), PTQ rows (val, and the selection split when QAT
    follows) -> (calibrated model, its settings); `rows` / `select_rows` are filled in place."""
    main = is_main_rank()
    if main and not opt.no_eval_origin:
        rows["FP32"] = evaluate(fp32, "FP32")
    qmodel, settings = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device, save_dir,
                                              select_fn)
    if opt.auto_skip is not None:
        settings = _auto_skip(opt, fp32, qmodel, settings, select_fn, save_dir)
        if settings.skip_layers != list(opt.skip_layers):
            qmodel, settings = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device,
                                                      save_dir, select_fn)
        opt.skip_layers = settings.skip_layers
    if getattr(opt, "bias_correction", 0):
        _correct_biases(opt, fp32, qmodel, calib_loader, device, save_dir)
    if main and not opt.no_eval_ptq:
        rows["PTQ"] = evaluate(qmodel, "PTQ (calibrated, before QAT)")
    if main and opt.epochs > 0:
        select_rows["PTQ"] = evaluate(qmodel, "PTQ on the selection split", select_fn)
    return qmodel, settings


def _correct_biases(opt, fp32, qmodel, calib_loader, device, save_dir):
    """--bias-correction N: conv biases shifted to the FP32 per-channel output means on N calibration
    images (qat.bias_correction); per-layer shifts in bias_correction.json, the count in opt."""
    from qat.bias_correction import bias_correction
    summary = bias_correction(qmodel, fp32, calib_loader, opt.bias_correction, device)
    if is_main_rank():
        (Path(save_dir) / "bias_correction.json").write_text(json.dumps(summary, indent=1))
        shifts = [r["mean_abs"] for r in summary]
        LOGGER.info(f"{colorstr('bias correction: ')}{len(summary)} convolutions on {opt.bias_correction} images, "
                    f"mean |shift| {sum(shifts) / max(len(shifts), 1):.3g}; {Path(save_dir) / 'bias_correction.json'}")
    return summary


def _chosen_rows(best_path, rows, select_rows, history, device, evaluate, trusted):
    """qat_best.pt's numbers on val (the reported split) and on the selection split it was chosen by."""
    from qat.checkpoint import load_qat
    ckpt_model, _, ckpt = load_qat(best_path, device, trusted=trusted)
    position = (int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0)))
    chosen = next((h for h in history if (h["epoch"], h["iteration"]) == position and "map" in h), None)
    if chosen is None:  # the PTQ model stayed the best
        val = rows.get("PTQ") or evaluate(ckpt_model, "qat_best.pt (= PTQ) on val")
        sel = select_rows.get("PTQ", {})
    else:
        val = evaluate(ckpt_model, f"qat_best.pt (QAT step {chosen['step']}) on val")
        sel = {k: chosen[k] for k in METRICS}
    step = 0 if chosen is None else chosen["step"]
    return {**{k: val[k] for k in METRICS}, "step": step}, {**{k: sel.get(k) for k in METRICS}, "step": step}


def _auto_skip(opt, fp32, qmodel, settings, select_fn, save_dir):
    """Rank 0 ranks layers on the selection split and picks the float set; every rank gets the new settings."""
    from qat.sensitivity import auto_skip, layer_sensitivity, skip_regex, write_sensitivity
    skip = None
    if is_main_rank():
        fp32_map = select_fn(fp32)["map"]
        base, ranked = layer_sensitivity(qmodel, select_fn)
        layers, reached, _ = auto_skip(qmodel, ranked, select_fn, fp32_map, opt.auto_skip, base_map=base)
        skip = {"budget": opt.auto_skip, "layers": layers, "map": reached}
        write_sensitivity(save_dir, fp32_map, base, ranked, skip)
        LOGGER.info(f"{colorstr('auto-skip: ')}layers {layers} stay float -> mAP50-95 {reached:.4f} on the selection "
                    f"split (FP32 {fp32_map:.4f}, budget {opt.auto_skip})")
    skip = broadcast(skip)
    extra = [skip_regex(i) for i in skip["layers"] if skip_regex(i) not in settings.skip_layers]
    return QuantSettings.from_dict({**settings.to_dict(), "skip_layers": settings.skip_layers + extra})


def run_sensitivity(opt):
    """`train_qat.py sensitive`: rank layers by the mAP50-95 they recover when kept float
    (sensitivity.md/json in runs/qat/<name>/), and with --auto-skip the float set for a budget."""
    from qat.sensitivity import auto_skip, layer_sensitivity, write_sensitivity
    from utils.torch_utils import select_device

    if WORLD_SIZE > 1:
        raise UserError("train_qat.py sensitive runs in one process: start it without torchrun")
    settings = check_opt(opt)
    device = select_device(opt.device, batch_size=opt.batch_size)
    init_seeds(opt.seed)
    check_demo_weights(str(opt.weights))
    data = load_data(opt.data)
    fp32, ckpt_opt = load_fp32(opt.weights, device, opt.trusted)
    check_nc(fp32, data, opt.weights, opt.data)
    stride = max(int(max(fp32.stride)), 32)
    imgsz = check_img_size(int(opt.imgsz or ckpt_opt.get("imgsz") or 640), stride)
    hyp = load_hyp(opt.hyp)
    save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    train_src, select_src = selection_split(data, opt, save_dir)
    _, calib_loader, val_loader = make_loaders(dict(data, train=train_src), imgsz, stride, opt, hyp)
    save_dir.mkdir(parents=True, exist_ok=True)
    val_fn = make_val_fn(data, val_loader, imgsz, opt.batch_size * 2, opt.val_batches)
    select_fn = make_val_fn(data, make_select_loader(select_src, int(data["nc"]), imgsz, stride, opt, hyp), imgsz, opt.batch_size * 2)
    fp32_map = val_fn(fp32)["map"]
    qmodel, _ = quantize_and_calibrate(fp32, settings, calib_loader, opt.calib_batches, device, save_dir, select_fn)
    base, ranked = layer_sensitivity(qmodel, val_fn)
    skip = None
    if opt.auto_skip is not None:
        layers, reached, _ = auto_skip(qmodel, ranked, val_fn, fp32_map, opt.auto_skip, base_map=base)
        skip = {"budget": opt.auto_skip, "layers": layers, "map": reached}
    f = write_sensitivity(save_dir, fp32_map, base, ranked, skip)
    LOGGER.info("\n" + f.read_text())
    return {"save_dir": save_dir, "fp32_map": fp32_map, "quantized_map": base, "ranked": ranked, "auto_skip": skip}


def run_from_train(model, opt, hyp, data_dict, device):
    """The hook train.py calls with `--qat` once its model is built and loaded (ours and, through
    patches/install.py, upstream's). The QAT options not on train.py's CLI take train_qat.py's
    defaults; --epochs, --imgsz, --batch-size, --workers, --seed, --device and the run folder are
    train.py's, and an epoch is one pass over the training data as in train.py (train_qat.py's
    default is 200 iterations). Returns train()'s results tuple (P, R, mAP50, mAP50-95, 0, 0, 0)
    of the best QAT model (PTQ with --epochs 0)."""
    qopt = default_opt()
    for k in ("data", "imgsz", "batch_size", "epochs", "workers", "seed", "device", "save_dir", "trusted"):
        if hasattr(opt, k):
            setattr(qopt, k, getattr(opt, k))
    qopt.weights = str(getattr(opt, "weights", "") or "")
    qopt.hyp = dict(hyp)
    qopt.iters_per_epoch = 0
    for k in vars(qopt):  # train.py may have been given QAT options too (ours does not define them)
        if k.startswith(("calib_", "weight_bits", "no_last_layer", "skip_layers", "residual_quant", "loss",
                         "iters_per_epoch", "bias_correction", "learn_ranges", "range_lr_mult")) \
                and hasattr(opt, k):
            setattr(qopt, k, getattr(opt, k))
    try:
        result = run(qopt, model=model, data_dict=data_dict, device=device, write_opt=False)
    except UserError as e:  # upstream's main() has no run_cli
        import sys
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    r = result["rows"].get("QAT") or result["rows"].get("PTQ") or {}
    return (r.get("mp", 0.0), r.get("mr", 0.0), r.get("map50", 0.0), r.get("map", 0.0), 0.0, 0.0, 0.0)


