"""Command-line helpers shared by every command: argparse value types with ranges, one-line errors.

    from utils.cli import ArgumentParser, add_device_arg, add_trusted_flag, cli_main, nonneg_int
    p = ArgumentParser(description=...)
    p.add_argument("--workers", type=nonneg_int, default=8)
    add_device_arg(p)
    add_trusted_flag(p)
    ...
    main = cli_main(parse_opt, run, run_cli)  # main(argv=None): parse, log the options, run(**options)

A value out of range is refused by argparse itself, before anything is loaded or written, as one
line `error: argument --workers: -1 is not a whole number >= 0` and exit status 2 (the same form
as `utils.general.run_cli` gives a UserError). Standard library only: patches/install.py copies this
module into an upstream clone together with qat/ and the CLIs that import it.
"""
import argparse
import inspect
import math
import sys
from pathlib import Path

MAX_IMGSZ = 8192  # px; beyond this a single image no longer fits in any accelerator's memory


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, `error: <what> (see <prog> --help)`, exit 2
    (argparse prints the whole usage first, which buries the one line that matters)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_range(lo=None, hi=None):
    """An argparse type: a whole number in [lo, hi] (either bound may be None)."""
    what = "a whole number" + (f" >= {lo}" if hi is None and lo is not None else "") + \
        (f" <= {hi}" if lo is None and hi is not None else "") + \
        (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def float_range(lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite number in the interval lo..hi (open at a bound with *_open)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    what = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
probability = float_range(0.0, 1.0)  # thresholds, IoUs, fractions
positive_float = float_range(0.0, lo_open=True)  # learning rates, ...
nonneg_float = float_range(0.0)  # weight decay, loss weights, ...
imgsz_int = int_range(32, MAX_IMGSZ)  # image sizes (a multiple of the stride is checked with the model)
opset_int = int_range(13, 23)  # per-channel QuantizeLinear needs 13; torch.onnx (2.x) exports up to 23


TRUSTED_HELP = "load a checkpoint that needs globals outside the safe-load allow-list (runs its code)"


def add_trusted_flag(parser):
    """--trusted: every command that reads a checkpoint loads it safely unless the user says otherwise."""
    parser.add_argument("--trusted", action="store_true", help=TRUSTED_HELP)


def add_device_arg(parser, default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu"):
    """--device as utils.torch_utils.select_device reads it."""
    parser.add_argument("--device", default=default, help=help)


def add_export_args(parser, weights_help, dynamic_help="dynamic batch, height and width axes"):
    """The ONNX export options export.py and export_qat.py share (one exporter: qat.export)."""
    parser.add_argument("--weights", type=str, required=True, help=weights_help)
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=imgsz_int, default=[640], help="image (h, w)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="batch size")
    parser.add_argument("--dynamic", action="store_true", help=dynamic_help)
    parser.add_argument("--opset", type=opset_int, default=17, help="ONNX opset version (13..23)")
    parser.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    add_device_arg(parser)


def cli_main(parse_opt, run, run_cli):
    """A command's `main(argv=None)`: parse `argv`, log the options on one line, return
    `run(**options)`; all of it inside `run_cli` (one-line errors). `run_cli` is passed in because a
    command installed into an upstream clone takes it from qat.compat (upstream's utils lack it)."""
    def main(argv=None):
        def parse_and_run():
            options = vars(parse_opt(argv))
            from utils.general import print_args  # imported here: this module stays standard library only
            if "prefix" in inspect.signature(print_args).parameters:  # ours names the command explicitly
                print_args(options, prefix=Path(inspect.getfile(run)).stem)
            else:  # upstream YOLOv9's (in a clone) names the file that calls it: this one, so leave it out
                print_args(options, show_file=False)
            return run(**options)

        return run_cli(parse_and_run)

    return main


def newest_file(folder, pattern):
    """The most recently modified file matching `pattern` under `folder`, or None: the run that
    `--resume` without a path continues."""
    files = sorted(Path(folder).glob(pattern), key=lambda f: f.stat().st_mtime)
    return files[-1] if files else None
