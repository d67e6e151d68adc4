"""utils.cli: range-checked argparse types, and parser errors as one `error:` line (exit 2); every
command's parser refuses the out-of-range values of issue 16 before it loads anything."""
import math

import pytest

from utils.cli import (ArgumentParser, float_range, imgsz_int, int_range, nonneg_int, opset_int, positive_float,
                       positive_int, probability)


def _parse_error(parser, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_types_accept_their_range_and_refuse_the_rest():
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and probability("1") == 1.0 and imgsz_int("640") == 640
    assert int_range(2, 4)("4") == 4 and float_range(0, 1, hi_open=True)("0.5") == 0.5
    bad = [(positive_int, "0"), (nonneg_int, "-1"), (nonneg_int, "1.5"), (probability, "2"), (probability, "nan"),
           (positive_float, "inf"), (positive_float, "0"), (positive_float, "-inf"), (imgsz_int, "0"),
           (imgsz_int, "100000"), (opset_int, "5"), (opset_int, "99"), (float_range(0, 1, hi_open=True), "1")]
    for parse, text in bad:
        with pytest.raises(Exception, match="is not"):
            parse(text)
    assert math.isfinite(positive_float("1e-5"))


def test_parser_error_is_one_line(capsys):
    p = ArgumentParser(prog="tool.py")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--mode", choices=("a", "b"), default="a")
    line = _parse_error(p, ["--seed", "-5"], capsys)
    assert "--seed" in line and "-5" in line and "tool.py --help" in line
    assert "--mode" in _parse_error(p, ["--mode", "c"], capsys)
    assert "unrecognized" in _parse_error(p, ["--sead", "1"], capsys)


@pytest.mark.parametrize("module, argv, flag", [
    ("train_qat", ["--seed", "-5"], "--seed"),
    ("train_qat", ["--workers", "-1"], "--workers"),
    ("train_qat", ["--val-batches", "-1"], "--val-batches"),
    ("train_qat", ["--lr", "inf"], "--lr"),
    ("train_qat", ["--lrf", "nan"], "--lrf"),
    ("train_qat", ["--det-weight", "nan"], "--det-weight"),
    ("train_qat", ["--imgsz", "0"], "--imgsz"),
    ("train_qat", ["--imgsz", "100000"], "--imgsz"),
    ("train_qat", ["--loss", "kl"], "--loss"),
    ("train_qat", ["--calib-method", "best"], "--calib-method"),
    ("train_qat", ["--weight-bits", "4"], "--weight-bits"),
    ("train_qat", ["sensitive", "--calib-batches", "0"], "--calib-batches"),
    ("val", ["--weights", "w.pt", "--batch-size", "0"], "--batch-size"),
    ("val", ["--weights", "w.pt", "--conf-thres", "2"], "--conf-thres"),
    ("val", ["--weights", "w.pt", "--imgsz", "100000"], "--imgsz"),
    ("export", ["--weights", "w.pt", "--opset", "5"], "--opset"),
    ("export_qat", ["--weights", "w.pt", "--opset", "99"], "--opset"),
    ("export_qat", ["--weights", "w.pt", "--iou-thres", "1.5"], "--iou-thres"),
    ("val_trt", ["--data", "d.yaml", "--backend", "tensorflow"], "--backend"),
    ("val_trt", ["--data", "d.yaml", "--tolerance", "-1"], "--tolerance"),
    ("train", ["--seed", "-5"], "--seed"),
    ("train", ["--freeze", "-1"], "--freeze"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("demo", ["--weight-bits", "6"], "--weight-bits"),
])
def test_every_command_refuses_out_of_range_flags(module, argv, flag, capsys):
    import importlib
    mod = importlib.import_module(module)
    parse_opt = getattr(mod, "parse_opt", None) or mod.main  # demo.py parses in main()
    with pytest.raises(SystemExit) as e:
        parse_opt(argv)
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]  # (an import may log a warning first)
    assert e.value.code == 2 and len(errors) == 1 and flag in errors[0] and "Traceback" not in err, err
